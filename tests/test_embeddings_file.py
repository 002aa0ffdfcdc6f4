"""Embeddings on disk: save_embeddings/load_embeddings, the model's identity check, and the CLI's
encode-once-then-rank path."""

import functools
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from colbert_triton import ColBERT, PackedEmbeddings, load_embeddings, save_embeddings
from colbert_triton.cli import main


def _packed(lengths, dim=8, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    values = torch.randn(sum(lengths), dim, generator=gen).to(dtype)
    return PackedEmbeddings.from_lengths(values, lengths)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_round_trip_keeps_values_lengths_ids_and_metadata(tmp_path, dtype):
    packed = _packed([3, 0, 1, 5], dtype=dtype)  # an empty item in the middle
    path = tmp_path / "e.safetensors"
    save_embeddings(path, packed, ids=["a", 7, None, {"k": 1}], metadata={"note": "x"})
    saved = load_embeddings(path)
    assert saved.embeddings.lengths_host == (3, 0, 1, 5)
    assert saved.embeddings.values.dtype == dtype
    assert torch.equal(saved.embeddings.values, packed.values)
    assert torch.equal(saved.embeddings.offsets, packed.offsets)
    assert saved.ids == ["a", 7, None, {"k": 1}]
    assert saved.metadata["note"] == "x"


def test_numpy_and_tensor_ids_are_stored_as_numbers(tmp_path):
    import numpy as np

    path = tmp_path / "e.safetensors"
    for ids in (np.arange(10, 13), torch.tensor([4, 5, 6]), [np.int64(1), np.int32(2), "x"]):
        save_embeddings(path, _packed([1, 2, 1]), ids=ids)
        assert load_embeddings(path).ids == (ids.tolist() if hasattr(ids, "tolist") else [1, 2, "x"])
    # An object array keeps numpy scalars in tolist(): made plain too.
    save_embeddings(path, _packed([1, 2, 1]), ids=np.array([np.int64(3), "y", np.float32(0.5)], dtype=object))
    assert load_embeddings(path).ids == [3, "y", 0.5]


@pytest.mark.parametrize("make_id", [int, lambda i: f"doc-{i:08d}"], ids=["int", "str"])
def test_ids_stay_out_of_the_header(tmp_path, make_id):
    """Ids live in tensors: the safetensors header (capped at 100 MB, ~10M ids) stays small
    however many items there are."""
    path = tmp_path / "e.safetensors"
    ids = [make_id(i) for i in range(200_000)]
    save_embeddings(path, PackedEmbeddings.from_lengths(torch.zeros(0, 4), [0] * len(ids)), ids=ids)
    header_bytes = int.from_bytes(path.read_bytes()[:8], "little")
    assert header_bytes < 4096
    assert load_embeddings(path).ids == ids
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:  # integers as int64, anything else as JSON bytes
        assert set(f.keys()) == {"values", "offsets", "ids" if make_id is int else "ids_json"}
        if make_id is int:
            assert f.get_tensor("ids").dtype == torch.int64


def test_ids_come_back_equal_from_any_sequence(tmp_path):
    """load_embeddings gives back a list equal to the ids saved (a tuple of ids is a sequence of
    ids; a tuple as one id is refused, see test_save_errors)."""
    path = tmp_path / "e.safetensors"
    for ids, expected in [(("a", "b", "c"), ["a", "b", "c"]), (range(3), [0, 1, 2]),
                          ((i for i in (7, 8, 9)), [7, 8, 9]),
                          ([["a", 1], {"k": [2]}, 1.5], [["a", 1], {"k": [2]}, 1.5])]:
        save_embeddings(path, _packed([1, 2, 1]), ids=ids)
        assert load_embeddings(path).ids == expected


def test_default_ids_are_positions(tmp_path):
    path = tmp_path / "e.safetensors"
    save_embeddings(path, _packed([2, 2, 1]))
    assert load_embeddings(path).ids == [0, 1, 2]
    # A file without ids in its metadata (another writer) gets positions too.
    save_file({"values": torch.zeros(3, 4), "offsets": torch.tensor([0, 1, 3])}, str(path))
    assert load_embeddings(path).ids == [0, 1]


@pytest.mark.parametrize("kwargs, error, message", [
    ({"ids": [1, 2]}, ValueError, "2 ids for 3 items"),
    ({"ids": [object(), 1, 2]}, TypeError, "JSON-serialisable"),
    # A string is not a list of ids (it would be one id per character), nor is a set (no order).
    ({"ids": "abc"}, TypeError, "ids must be a list .* with one id per item, got str"),
    ({"ids": b"abc"}, TypeError, "ids must be a list .* with one id per item, got bytes"),
    ({"ids": {"a", "b", "c"}}, TypeError, "with one id per item, got set"),
    ({"ids": 3}, TypeError, "with one id per item, got int"),
    ({"ids": torch.tensor(3)}, TypeError, "with one id per item, got a 0-d array"),
    # Ids that JSON would give back changed, not equal to the caller's.
    ({"ids": ["a", ("b", 1), "c"]}, TypeError, r"ids\[1\] = \('b', 1\) would come back .* as \['b', 1\]"),
    ({"ids": ["a", {1: "x"}, "c"]}, TypeError, r"ids\[1\] = \{1: 'x'\} would come back .* as \{'1': 'x'\}"),
    # JSON has no NaN or infinity: a file holding them would give results no JSON reader takes.
    ({"ids": ["a", float("nan"), "c"]}, TypeError, r"ids\[1\] = nan: NaN and infinite ids"),
    ({"ids": ["a", "b", float("-inf")]}, TypeError, r"ids\[2\] = -inf: NaN and infinite ids"),
    ({"ids": ["a", [float("inf")], "c"]}, TypeError, "JSON-serialisable"),
    ({"ids": ["a", functools.reduce(lambda inner, _: [inner], range(100_000), []), "c"]}, TypeError,
     "JSON-serialisable"),  # nested past Python's recursion limit
    ({"metadata": {"layout": "x"}}, ValueError, "reserved"),
    ({"metadata": {"n": 1}}, TypeError, "strings to strings"),
])
def test_save_errors(tmp_path, kwargs, error, message):
    with pytest.raises(error, match=message):
        save_embeddings(tmp_path / "e.safetensors", _packed([1, 1, 1]), **kwargs)
    assert not (tmp_path / "e.safetensors").exists()


def test_saving_keeps_links_and_modes_as_open_would(tmp_path):
    """safetensors writes a private temporary file and renames it over the path: the file's
    mode (a new file: 0o666 less the umask) and a symbolic link at the path are kept."""
    import os
    import stat

    old_umask = os.umask(0o022)
    try:
        fresh = tmp_path / "fresh.safetensors"
        save_embeddings(fresh, _packed([1, 2]))
        assert stat.S_IMODE(fresh.stat().st_mode) == 0o644
        fresh.chmod(0o640)
        save_embeddings(fresh, _packed([2]))
        assert stat.S_IMODE(fresh.stat().st_mode) == 0o640 and load_embeddings(fresh).ids == [0]
    finally:
        os.umask(old_umask)
    link = tmp_path / "link.safetensors"
    link.symlink_to(fresh)
    save_embeddings(link, _packed([1, 1, 1]))
    assert link.is_symlink() and len(load_embeddings(fresh).ids) == 3


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.float8_e4m3fn])
def test_save_refuses_values_load_would_refuse(tmp_path, dtype):
    packed = PackedEmbeddings.from_lengths(torch.ones(3, 4).to(dtype), [1, 2])
    with pytest.raises(TypeError, match=f"embeddings.values must be floating point .*got {dtype}"):
        save_embeddings(tmp_path / "e.safetensors", packed)
    assert not (tmp_path / "e.safetensors").exists()


def test_load_onto_a_device_this_machine_lacks_is_a_clear_error(tmp_path):
    save_embeddings(tmp_path / "e.safetensors", _packed([1, 2]))
    with pytest.raises(ValueError, match="device must be like"):
        load_embeddings(tmp_path / "e.safetensors", device="gpu")
    with pytest.raises(ValueError, match="a CPU or a CUDA device"):
        load_embeddings(tmp_path / "e.safetensors", device="meta")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            load_embeddings(tmp_path / "e.safetensors", device="cuda")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_a_list_is_written_as_its_packed_form_is(tmp_path, dtype):
    """A list of per-item tensors (views into larger ones, as encode_documents returns them) is
    written item by item, never joined: the same file as its packed form, which safetensors'
    own reader reads back."""
    from safetensors.torch import load_file

    batch = torch.randn(9, 6).to(dtype)
    items = [batch[4:7], batch[0:0], batch[7:9], batch[0:4]]  # out of order, one empty
    listed, packed = tmp_path / "listed.safetensors", tmp_path / "packed.safetensors"
    save_embeddings(listed, items, ids=["a", "b", 3, None], metadata={"note": "x"})
    save_embeddings(packed, PackedEmbeddings.from_list(items), ids=["a", "b", 3, None], metadata={"note": "x"})
    assert listed.read_bytes() == packed.read_bytes()
    theirs = load_file(str(listed))
    assert torch.equal(theirs["values"], torch.cat(items)) and theirs["values"].dtype == dtype
    assert theirs["offsets"].tolist() == [0, 3, 3, 5, 9]
    saved = load_embeddings(listed)
    assert saved.ids == ["a", "b", 3, None] and saved.metadata["note"] == "x"
    assert [torch.equal(a, b) for a, b in zip(saved.embeddings.to_list(), items)] == [True] * 4
    empty = tmp_path / "empty.safetensors"  # no items: a file all the same
    save_embeddings(empty, PackedEmbeddings.from_lengths(torch.zeros(0, 6), []))
    assert len(load_embeddings(empty).ids) == 0 and load_file(str(empty))["values"].shape == (0, 6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="device parts")
def test_a_list_on_the_gpu_is_copied_to_the_host_in_chunks(tmp_path, monkeypatch):
    """GPU items are joined into chunks (here of 1,000 bytes) and each chunk copied to the host
    once, not each item: the same file as from host tensors."""
    from colbert_triton import packed as packed_module

    monkeypatch.setattr(packed_module, "_HOST_CHUNK_BYTES", 1000)
    items = [torch.randn(n, 6, device="cuda") for n in (30, 1, 0, 50, 7)]  # 24 bytes a row
    host_copies = []
    cpu = torch.Tensor.cpu
    monkeypatch.setattr(torch.Tensor, "cpu", lambda t, *a, **k: host_copies.append(t.numel()) or cpu(t, *a, **k))
    save_embeddings(tmp_path / "gpu.safetensors", items)
    monkeypatch.setattr(torch.Tensor, "cpu", cpu)
    save_embeddings(tmp_path / "host.safetensors", [item.cpu() for item in items])
    assert (tmp_path / "gpu.safetensors").read_bytes() == (tmp_path / "host.safetensors").read_bytes()
    assert host_copies == [81 * 6, 7 * 6]  # 30 + 1 + 0 + 50 rows (past 1,000 bytes), then 7


def test_a_failed_write_leaves_the_old_file_and_no_other(tmp_path, monkeypatch):
    import os

    path = tmp_path / "e.safetensors"
    save_embeddings(path, _packed([1, 2]))
    before = path.read_bytes()

    def full(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(ValueError, match="could not write .*e.safetensors: No space left on device"):
        save_embeddings(path, _packed([3]))
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["e.safetensors"]


def test_save_path_errors(tmp_path):
    with pytest.raises(TypeError, match="PackedEmbeddings or a list of"):
        save_embeddings(tmp_path / "e.safetensors", torch.zeros(2, 4))
    with pytest.raises(ValueError, match="embeddings is an empty list"):
        save_embeddings(tmp_path / "e.safetensors", [])
    with pytest.raises(ValueError, match=r"embeddings\[1\] has dim 3, embeddings\[0\] has 4"):
        save_embeddings(tmp_path / "e.safetensors", [torch.zeros(2, 4), torch.zeros(1, 3)])
    with pytest.raises(TypeError, match="embeddings must be floating point"):
        save_embeddings(tmp_path / "e.safetensors", [torch.zeros(2, 4, dtype=torch.int64)])
    with pytest.raises(ValueError, match="is a directory"):
        save_embeddings(tmp_path, _packed([1]))
    with pytest.raises(ValueError, match="directory does not exist"):
        save_embeddings(tmp_path / "no" / "e.safetensors", _packed([1]))


@pytest.mark.parametrize("tensors, metadata, message", [
    ({"values": torch.zeros(3, 4)}, None, "no offsets tensor"),
    ({"values": torch.zeros(3), "offsets": torch.tensor([0, 3])}, None, r"must be \[T, dim\]"),
    ({"values": torch.zeros(3, 4, dtype=torch.int32), "offsets": torch.tensor([0, 3])}, None, "floating point"),
    ({"values": torch.zeros(3, 4).to(torch.float8_e4m3fn), "offsets": torch.tensor([0, 3])}, None,
     "floating point .float16, bfloat16, float32 or float64., got torch.float8_e4m3fn"),
    ({"values": torch.zeros(3, 4), "offsets": torch.tensor([0.0, 3.0])}, None, "offsets must be int32 or int64"),
    ({"values": torch.zeros(3, 4), "offsets": torch.tensor([0, 3], dtype=torch.uint8)}, None,
     "offsets must be int32 or int64, got torch.uint8"),
    # Offsets whose differences wrap past int64 (each "length" then looks non-negative):
    ({"values": torch.zeros(3, 4), "offsets": torch.tensor([0, 2**63 - 1, -2, 3])}, None, "rise from 0"),
    ({"values": torch.zeros(3, 4), "offsets": torch.tensor([[0, 3]])}, None, r"offsets must be \[n \+ 1\]"),
    ({"values": torch.zeros(3, 4), "offsets": torch.tensor([1, 3])}, None, "rise from 0"),
    ({"values": torch.zeros(3, 4), "offsets": torch.tensor([0, 2])}, None, "rise from 0"),
    ({"values": torch.zeros(3, 4), "offsets": torch.tensor([0, 2, 1, 3])}, None, "rise from 0"),
    # Ids as the first version wrote them, in the header:
    ({"values": torch.zeros(3, 4), "offsets": torch.tensor([0, 3])}, {"ids": "[1, 2]"}, "2 ids for 1 items"),
    ({"values": torch.zeros(3, 4), "offsets": torch.tensor([0, 3])}, {"ids": "{"}, "not JSON"),
    ({"values": torch.zeros(3, 4), "offsets": torch.tensor([0, 3])}, {"ids": "{}"}, "not a JSON list"),
    # ... and as tensors:
    ({"values": torch.zeros(3, 4), "offsets": torch.tensor([0, 3]), "ids": torch.tensor([1, 2])}, None,
     "2 ids for 1 items"),
    ({"values": torch.zeros(3, 4), "offsets": torch.tensor([0, 3]), "ids": torch.tensor([1.0])}, None,
     "1-D int64"),
    ({"values": torch.zeros(3, 4), "offsets": torch.tensor([0, 3]),
      "ids_json": torch.tensor(list(b"[1"), dtype=torch.uint8)}, None, "not JSON"),
    ({"values": torch.zeros(3, 4), "offsets": torch.tensor([0, 3]),
      "ids_json": torch.tensor([0x5B, 0xFF, 0x5D], dtype=torch.uint8)}, None, "not UTF-8"),
    ({"values": torch.zeros(3, 4), "offsets": torch.tensor([0, 3]),  # nested past Python's recursion limit
      "ids_json": torch.tensor(list(b"[" * 100_000 + b"]" * 100_000), dtype=torch.uint8)}, None, "not JSON"),
])
def test_load_rejects_inconsistent_files(tmp_path, tensors, metadata, message):
    path = tmp_path / "bad.safetensors"
    save_file(tensors, str(path), metadata=metadata)
    with pytest.raises(ValueError, match=message):
        load_embeddings(path)


def test_load_rejects_missing_and_foreign_files(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        load_embeddings(tmp_path / "none.safetensors")
    garbage = tmp_path / "g.safetensors"
    garbage.write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="not a safetensors file"):
        load_embeddings(garbage)


def test_model_round_trip_scores_like_fresh_embeddings(model, tmp_path):
    texts = ["The Eiffel Tower is in Paris.", "Bananas are yellow.", "!!!"]
    corpus = model.encode_documents(texts, packed=True)
    path = tmp_path / "corpus.safetensors"
    model.save_embeddings(path, corpus, ids=["e", "b", "p"], metadata={"source": "a test"})
    saved = model.load_embeddings(path)
    assert saved.ids == ["e", "b", "p"]
    assert saved.metadata["kind"] == "documents" and saved.metadata["fingerprint"] == model.fingerprint
    assert saved.metadata["source"] == "a test"
    listed = tmp_path / "listed.safetensors"  # the unpacked list: written item by item, the same file
    model.save_embeddings(listed, model.encode_documents(texts), ids=["e", "b", "p"], metadata={"source": "a test"})
    assert listed.read_bytes() == path.read_bytes()
    with pytest.raises(ValueError, match="these are 8-d embeddings; this model makes 96-d ones"):
        model.save_embeddings(listed, [torch.zeros(2, 8)])
    for key in ("kind", "fingerprint", "dim"):  # the model's own: a caller's would make it lie
        with pytest.raises(ValueError, match=rf"metadata keys \['{key}'\] are reserved"):
            model.save_embeddings(tmp_path / "other.safetensors", corpus, metadata={key: "x"})
    assert not (tmp_path / "other.safetensors").exists()
    queries = model.encode_queries(["where is the eiffel tower"])
    torch.testing.assert_close(model.score(queries, saved.embeddings), model.score(queries, corpus),
                               rtol=0, atol=0)
    # The file object itself also goes where embeddings go.
    torch.testing.assert_close(model.score(queries, saved), model.score(queries, corpus), rtol=0, atol=0)
    assert model.load_embeddings(path, device="cpu").embeddings.values.device.type == "cpu"
    with pytest.raises(ValueError, match="device must be like"):
        model.load_embeddings(path, device="gpu")


def test_fingerprint_is_the_checkpoint_not_the_layout_or_dtype(model, stanford_dir, pylate_dir, tmp_path):
    import shutil

    from checkpoints import build_stanford
    from safetensors.torch import load_file

    assert ColBERT.from_pretrained(pylate_dir, device="cpu").fingerprint == model.fingerprint
    assert ColBERT.from_pretrained(stanford_dir, device="cpu", dtype="bfloat16").fingerprint == model.fingerprint
    # The same checkpoint stored in float16.
    half = shutil.copytree(stanford_dir, tmp_path / "half")
    state = load_file(str(half / "model.safetensors"))
    save_file({k: v.half() for k, v in state.items()}, str(half / "model.safetensors"))
    assert ColBERT.from_pretrained(half, device="cpu").fingerprint == model.fingerprint
    # Another head; the same head with one attention weight changed.
    other = ColBERT.from_pretrained(build_stanford(tmp_path / "other", seed=1), device="cpu")
    assert other.fingerprint != model.fingerprint
    tuned = shutil.copytree(stanford_dir, tmp_path / "tuned")
    state = load_file(str(tuned / "model.safetensors"))
    name = next(k for k in state if k.endswith("attention.self.query.weight"))
    state[name][0, 0] += 0.01
    save_file(state, str(tuned / "model.safetensors"))
    assert ColBERT.from_pretrained(tuned, device="cpu").fingerprint != model.fingerprint


def test_model_refuses_other_models_dims_and_kinds(model, tmp_path):
    from checkpoints import build_stanford

    path = tmp_path / "corpus.safetensors"
    other = ColBERT.from_pretrained(build_stanford(tmp_path / "other", seed=1), device="cpu")
    other.save_embeddings(path, other.encode_documents(["a text"], packed=True))
    with pytest.raises(ValueError, match="encoded by another model"):
        model.load_embeddings(path)
    narrow = ColBERT.from_pretrained(build_stanford(tmp_path / "narrow", dim=32), device="cpu")
    narrow.save_embeddings(path, narrow.encode_documents(["a text"], packed=True))
    with pytest.raises(ValueError, match="32-d embeddings; this model makes 96-d"):
        model.load_embeddings(path)
    model.save_embeddings(path, model.encode_queries(["a query"], packed=True), kind="queries")
    with pytest.raises(ValueError, match="holds queries, not documents"):
        model.load_embeddings(path)
    assert len(model.load_embeddings(path, kind="queries").embeddings) == 1
    with pytest.raises(ValueError, match="kind must be"):
        model.load_embeddings(path, kind="docs")
    with pytest.raises(ValueError, match="32-d embeddings; this model makes 96-d"):
        model.save_embeddings(path, narrow.encode_documents(["a text"], packed=True))
    # A file whose fingerprint was taken another way (an older version): say so.
    corpus = model.encode_documents(["a text"], packed=True)
    save_embeddings(path, corpus, metadata={"kind": "documents", "fingerprint": "0123456789abcdef"})
    with pytest.raises(ValueError, match="another version of colbert-triton"):
        model.load_embeddings(path)


def test_model_checks_the_header_before_reading_the_values(model, tmp_path, monkeypatch):
    import safetensors
    from checkpoints import build_stanford

    path = tmp_path / "corpus.safetensors"
    other = ColBERT.from_pretrained(build_stanford(tmp_path / "other", seed=1), device="cpu")
    other.save_embeddings(path, other.encode_documents(["a text"], packed=True))

    opened = []
    real_open = safetensors.safe_open
    monkeypatch.setattr(safetensors, "safe_open", lambda *a, **k: opened.append(a) or real_open(*a, **k))
    with pytest.raises(ValueError, match="encoded by another model"):
        model.load_embeddings(path)
    assert len(opened) == 1  # the header's open; the values' never came


def test_a_file_saved_over_during_a_load_is_read_whole(model, tmp_path, monkeypatch):
    """Another process may rename a new file over the path mid-load (a save in progress): the
    header checked and the values read are one file's, never a mix, and the other model's file
    cannot slip past the check."""
    import os

    from checkpoints import build_stanford

    from colbert_triton import packed

    other = ColBERT.from_pretrained(build_stanford(tmp_path / "other", seed=1), device="cpu")
    foreign = tmp_path / "foreign.safetensors"
    other.save_embeddings(foreign, other.encode_documents(["another text", "x"], packed=True), ids=["p", "q"])
    path = tmp_path / "corpus.safetensors"
    mine = model.encode_documents(["a text"], packed=True)
    model.save_embeddings(path, mine, ids=["a"])
    real_read_header = packed._read_header

    def header_then_swap(source, shown):
        info = real_read_header(source, shown)
        os.replace(foreign, path)  # lands between the header's check and the values' read
        return info

    monkeypatch.setattr(packed, "_read_header", header_then_swap)
    saved = model.load_embeddings(path)
    assert saved.ids == ["a"] and torch.equal(saved.embeddings.values, mine.values)
    monkeypatch.setattr(packed, "_read_header", real_read_header)
    with pytest.raises(ValueError, match="encoded by another model"):  # the path now names it
        model.load_embeddings(path)


def test_cli_ranks_a_saved_corpus_like_its_texts(stanford_dir, tmp_path, capsys):
    docs = tmp_path / "docs.jsonl"
    docs.write_text("\n".join(json.dumps({"id": f"d{i}", "text": t}) for i, t in enumerate(
        ["The Eiffel Tower is in Paris.", "Bananas are a yellow fruit.", "ColBERT uses MaxSim."])))
    common = ["--model", str(stanford_dir), "--device", "cpu", "--no-progress"]
    encoded = tmp_path / "docs.safetensors"
    assert main(["encode", *common, "--input", str(docs), "--output", str(encoded)]) == 0
    query = ["--query", "yellow fruit", "--query", "paris", "-k", "3"]
    assert main(["rank", *common, "--documents", str(docs), *query]) == 0
    from_texts = capsys.readouterr().out
    assert main(["rank", *common, "--documents", str(encoded), *query]) == 0
    from_file = capsys.readouterr().out
    assert from_file == from_texts
    assert json.loads(from_file.splitlines()[0])["results"][0]["id"] in ("d0", "d1", "d2")


def test_cli_saved_corpus_errors(stanford_dir, tmp_path, capsys):
    common = ["--model", str(stanford_dir), "--device", "cpu", "--no-progress", "--query", "x"]
    assert main(["rank", *common, "--documents", str(tmp_path / "none.safetensors")]) == 2
    assert "documents file not found" in capsys.readouterr().err
    queries = tmp_path / "q.txt"
    queries.write_text("a query\n")
    encoded = tmp_path / "q.safetensors"
    assert main(["encode", "--model", str(stanford_dir), "--device", "cpu", "--no-progress",
                 "--kind", "queries", "--input", str(queries), "--output", str(encoded)]) == 0
    assert main(["rank", *common, "--documents", str(encoded)]) == 2
    assert "holds queries, not documents" in capsys.readouterr().err
    # rank reads a corpus file by its suffix: encode writes only such files.
    assert main(["encode", "--model", str(stanford_dir), "--device", "cpu", "--no-progress",
                 "--input", str(queries), "--output", str(tmp_path / "docs.emb")]) == 2
    assert "--output must be a .safetensors file" in capsys.readouterr().err
    assert not (tmp_path / "docs.emb").exists()


def test_cli_keeps_a_corpus_too_large_for_the_gpu_in_host_memory(monkeypatch, stanford_dir, tmp_path,
                                                                  capsys):
    from colbert_triton import cli

    assert cli._fits_on_device(1 << 40, torch.device("cpu"))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (1000, 8000))
    assert cli._fits_on_device(500, torch.device("cuda"))
    assert not cli._fits_on_device(501, torch.device("cuda"))
    # The host-memory branch of rank: same results, and it says what it does.
    docs = tmp_path / "docs.txt"
    docs.write_text("The Eiffel Tower is in Paris.\nBananas are yellow.\n")
    common = ["--model", str(stanford_dir), "--device", "cpu", "--no-progress"]
    encoded = tmp_path / "docs.safetensors"
    assert main(["encode", *common, "--input", str(docs), "--output", str(encoded)]) == 0
    assert main(["rank", *common, "--documents", str(encoded), "--query", "paris"]) == 0
    in_memory = capsys.readouterr().out
    monkeypatch.setattr(cli, "_fits_on_device", lambda num_bytes, device: False)
    assert main(["rank", *common, "--documents", str(encoded), "--query", "paris"]) == 0
    captured = capsys.readouterr()
    assert captured.out == in_memory and "stays in host memory" in captured.err
    # A text corpus too: encoded into host memory (and asked for there), the same results.
    asked = []
    encode = ColBERT.encode_documents
    monkeypatch.setattr(ColBERT, "encode_documents", lambda self, *args, **kwargs:
                        asked.append(kwargs["output_device"]) or encode(self, *args, **kwargs))
    assert main(["rank", *common, "--documents", str(docs), "--query", "paris"]) == 0
    captured = capsys.readouterr()
    assert captured.out == in_memory and "is kept in host memory as it is encoded" in captured.err
    monkeypatch.setattr(cli, "_fits_on_device", lambda num_bytes, device: True)
    assert main(["rank", *common, "--documents", str(docs), "--query", "paris"]) == 0
    assert capsys.readouterr().err == "" and asked == ["cpu", None]


def _mapped_spans(path) -> list[tuple[int, int]]:
    """The address ranges of this process's memory mappings of ``path`` (Linux)."""
    spans = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5] == str(Path(path).resolve()):
            start, end = (int(x, 16) for x in fields[0].split("-"))
            spans.append((start, end))
    return spans


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads the process's mappings (Linux)")
def test_a_saved_corpus_is_mapped_from_its_file_not_read_into_memory(model, tmp_path):
    """What lets a corpus larger than the host's memory be searched (README): the values of a
    loaded file, in the model's dtype, on the host, are the file's pages mapped into memory,
    read as they are used (safetensors maps the file), not a copy."""
    path = tmp_path / "corpus.safetensors"
    values = torch.nn.functional.normalize(torch.randn(3000, model.dim), dim=1)
    corpus = PackedEmbeddings.from_lengths(values, [1000, 0, 2000])
    model.save_embeddings(path, corpus)
    for loaded in (load_embeddings(path).embeddings, model.load_embeddings(path, device="cpu").embeddings):
        assert torch.equal(loaded.values, values)
        pointer = loaded.values.data_ptr()
        assert any(start <= pointer < end for start, end in _mapped_spans(path))
    queries = model.encode_queries(["a query"])
    assert torch.equal(model.search(queries, loaded, k=2)[1], model.search(queries, corpus, k=2)[1])


@pytest.mark.parametrize("name", ["docs.safetensors", "docs.SafeTensors"])  # the suffix in any case
def test_cli_refuses_a_foreign_file_before_loading_the_model(tmp_path, capsys, monkeypatch, name):
    from colbert_triton import cli

    monkeypatch.setattr(cli, "_load_model", lambda args: pytest.fail("model loaded first"))
    garbage = tmp_path / name
    garbage.write_bytes(b"\x00" * 64)
    assert main(["rank", "--documents", str(garbage), "--query", "x"]) == 2
    assert "not a safetensors file" in capsys.readouterr().err


def test_model_loads_a_file_written_without_a_model(model, tmp_path):
    """README: a file written by colbert_triton.save_embeddings carries no fingerprint (nor kind)
    and is not checked: the model loads it as documents or as queries, in its own dtype."""
    corpus = model.encode_documents(["The Eiffel Tower is in Paris.", "Bananas are yellow."], packed=True)
    path = tmp_path / "plain.safetensors"
    save_embeddings(path, PackedEmbeddings.from_lengths(corpus.values.half(), corpus.lengths_host), ids=["e", "b"])
    saved = model.load_embeddings(path)
    assert saved.ids == ["e", "b"] and "fingerprint" not in saved.metadata
    assert saved.embeddings.values.dtype == model.dtype
    torch.testing.assert_close(saved.embeddings.values, corpus.values, atol=1e-3, rtol=0)
    assert len(model.load_embeddings(path, kind="queries").embeddings) == 2


def test_load_refuses_empty_offsets_as_a_bad_file(tmp_path):
    """offsets of shape [0] cannot be [n + 1]: a ValueError from the header (not an IndexError, nor
    -1 items from embeddings_file_info)."""
    from colbert_triton.packed import embeddings_file_info

    path = tmp_path / "bad.safetensors"
    save_file({"values": torch.zeros(0, 4), "offsets": torch.zeros(0, dtype=torch.int64)}, str(path))
    for read in (load_embeddings, embeddings_file_info):
        with pytest.raises(ValueError, match=r"offsets must be \[n \+ 1\]"):
            read(path)


def test_load_takes_int32_offsets(tmp_path):
    """A file whose offsets are int32 (as another writer may store them) loads as int64 offsets."""
    path = tmp_path / "int32.safetensors"
    values = torch.randn(5, 4)
    save_file({"values": values, "offsets": torch.tensor([0, 2, 2, 5], dtype=torch.int32)}, str(path))
    saved = load_embeddings(path)
    assert saved.embeddings.lengths_host == (2, 0, 3) and saved.embeddings.offsets.dtype == torch.int64
    assert torch.equal(saved.embeddings.values, values) and saved.ids == [0, 1, 2]


def test_load_refuses_ids_that_are_not_one_dimensional(tmp_path):
    """An [n, 1] int64 ids tensor holds n entries but not n ids: refused, not read as lists."""
    path = tmp_path / "bad.safetensors"
    save_file({"values": torch.zeros(3, 4), "offsets": torch.tensor([0, 1, 3]),
               "ids": torch.tensor([[7], [8]])}, str(path))
    with pytest.raises(ValueError, match="1-D int64"):
        load_embeddings(path)


def test_boolean_ids_come_back_booleans(tmp_path):
    """True and False are ids JSON keeps (a JSONL "id": true): stored as JSON, not as the int64s 1
    and 0 (which compare equal but print as numbers)."""
    path = tmp_path / "e.safetensors"
    save_embeddings(path, PackedEmbeddings.from_lengths(torch.zeros(3, 4), [1, 1, 1]), ids=[True, False, 2])
    ids = load_embeddings(path).ids
    assert ids == [True, False, 2] and [type(i) for i in ids] == [bool, bool, int]
