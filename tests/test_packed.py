"""PackedEmbeddings: items, lengths and offsets agree with the list they were packed from
(its input checks are in test_api_errors.py, its files in test_embeddings_file.py)."""

import pytest
import torch

from colbert_triton import PackedEmbeddings


def test_items_offsets_and_lengths_match_the_packed_list():
    gen = torch.Generator().manual_seed(0)
    items = [torch.randn(n, 5, generator=gen) for n in (2, 0, 3, 1, 0, 4)]
    packed = PackedEmbeddings.from_list(items)
    assert len(packed) == 6 and packed.dim == 5
    assert packed.offsets.tolist() == [0, 2, 2, 5, 6, 6, 10]
    assert packed.starts.tolist() == [0, 2, 2, 5, 6, 6]
    assert packed.lengths.tolist() == [2, 0, 3, 1, 0, 4]
    for i, item in enumerate(items):
        assert torch.equal(packed[i], item)
        assert torch.equal(packed[i - len(items)], item)  # negative indices, as a list's
    assert all(torch.equal(a, b) for a, b in zip(packed.to_list(), items))
    as_half = packed.to(torch.float16)
    assert as_half.values.dtype == torch.float16 and as_half.lengths_host == packed.lengths_host


def test_equality_is_identity():
    """Two packs of equal tensors compare unequal without raising (tensors have no single
    truth value); a pack equals itself."""
    a = PackedEmbeddings.from_list([torch.ones(2, 3)])
    b = PackedEmbeddings.from_list([torch.ones(2, 3)])
    same = a
    assert a == same and a != b


def test_values_and_offsets_are_tensors_on_one_device():
    with pytest.raises(TypeError, match="values must be a torch.Tensor, got ndarray"):
        PackedEmbeddings.from_lengths(torch.zeros(3, 4).numpy(), [3])
    with pytest.raises(TypeError, match="offsets must be a torch.Tensor, got list"):
        PackedEmbeddings(torch.zeros(3, 4), [0, 3], (3,))
    with pytest.raises(ValueError, match="cannot pack an empty list of embeddings"):
        PackedEmbeddings.from_list([])
    with pytest.raises(ValueError, match="offsets are on meta but values on cpu"):
        PackedEmbeddings(torch.zeros(3, 4), torch.tensor([0, 3], device="meta"), (3,))


def test_to_where_it_already_is_returns_it():
    packed = PackedEmbeddings.from_list([torch.ones(2, 3), torch.zeros(1, 3)])
    assert packed.to("cpu") is packed and packed.to(torch.float32) is packed
    assert packed.to(torch.float16) is not packed
