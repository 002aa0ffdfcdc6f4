"""Test-session set-up shared by every test module.

Without CUDA the Triton kernels run on the CPU through Triton's interpreter. It is chosen here,
before any kernel module is imported, because `triton.jit` reads TRITON_INTERPRET when a
kernel is defined.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from cuda_faults import end_process_on_cuda_fault

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
if INTERPRETED and os.environ.get("COLBERT_TRITON_MEMCHECK", "1") != "0":
    import memcheck

    memcheck.install()  # every interpreted load and store stays inside the launch's tensors
    memcheck.poison_allocations()  # and nothing reads what the package left unwritten
KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# bfloat16 in the interpreter too: `kernels._interpreter.fix_gpu_numerics` makes its dots and casts
# a GPU's.
KERNEL_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture
def kernel_device():
    return KERNEL_DEVICE


@pytest.fixture
def triton_by_default(monkeypatch):
    """No backend named resolves to the Triton kernels on every device, as on CUDA once they are
    the default (`scoring.TRITON_DEFAULT_CAPABILITIES`): what the default does then, tested here."""
    from colbert_triton import scoring

    resolve = scoring.resolve_backend
    monkeypatch.setattr(scoring, "resolve_backend",
                        lambda device, backend: "triton" if backend is None else resolve(device, backend))


def randn(gen, *shape, scale=1.0, shift=0.0, dtype=torch.float32, device=KERNEL_DEVICE) -> torch.Tensor:
    """Seeded normal values (drawn in fp32 on the CPU, so every device sees the same numbers)."""
    return (torch.randn(*shape, generator=gen) * scale + shift).to(dtype).to(device)


@pytest.fixture(autouse=True)
def _cuda_faults_stop_the_process(request):
    yield
    end_process_on_cuda_fault(request.node.nodeid)


_GUARD_ELEMENTS = 4096
_guarded: list[tuple[torch.Tensor, int]] = []


def poisoned(shape, dtype, device=KERNEL_DEVICE) -> torch.Tensor:
    """An all-NaN output, so an element a kernel does not write fails the comparison, laid at the
    start of a longer NaN buffer: the guard band after it must stay NaN (checked after each
    test), so a store past the end (a missing row mask) fails too instead of going unseen."""
    numel = 1
    for size in shape:
        numel *= size
    buffer = torch.full((numel + _GUARD_ELEMENTS,), float("nan"), dtype=dtype, device=device)
    _guarded.append((buffer, numel))
    return buffer[:numel].view(shape)


@pytest.fixture(autouse=True)
def _guard_bands_stay_untouched():
    _guarded.clear()
    yield
    for buffer, numel in _guarded:
        assert bool(buffer[numel:].isnan().all()), "a kernel wrote past the end of its output"
    _guarded.clear()


@pytest.fixture(scope="session")
def stanford_dir(tmp_path_factory):
    from checkpoints import build_stanford

    return build_stanford(tmp_path_factory.mktemp("ckpt") / "stanford")


@pytest.fixture(scope="session")
def pylate_dir(tmp_path_factory):
    from checkpoints import build_pylate

    return build_pylate(tmp_path_factory.mktemp("ckpt") / "pylate")


@pytest.fixture(scope="session", params=["stanford", "pylate"])
def checkpoint_dir(request, stanford_dir, pylate_dir):
    return stanford_dir if request.param == "stanford" else pylate_dir


@pytest.fixture(scope="session")
def model(stanford_dir):
    from colbert_triton import ColBERT

    return ColBERT.from_pretrained(stanford_dir, device="cpu")


def require_reference(module: str):
    """Import a reference library; skip without it, unless CI demands every reference."""
    if os.environ.get("COLBERT_TRITON_REQUIRE_REFERENCES") == "1":
        import importlib

        return importlib.import_module(module)
    return pytest.importorskip(module)
