"""The whole encoder on the Triton ops against the PyTorch path, on the real MiniLM-based checkpoint.

Without a GPU this runs in the Triton interpreter on a few short texts; on a GPU, on the
whole text set, in float16 and bfloat16.
"""

import pytest
import torch
from conftest import INTERPRETED, KERNEL_DEVICE
from texts import DOCUMENTS, QUERIES

from colbert_triton import ColBERT

DTYPES = [torch.float32, torch.float16] + ([] if INTERPRETED else [torch.bfloat16])
if INTERPRETED:
    QUERY_TEXTS, DOC_TEXTS = QUERIES[:2] + QUERIES[3:5], DOCUMENTS[:2] + DOCUMENTS[7:9]
else:
    QUERY_TEXTS, DOC_TEXTS = QUERIES, DOCUMENTS


@pytest.fixture(scope="module")
def reference(stanford_dir):
    model = ColBERT.from_pretrained(stanford_dir, device=KERNEL_DEVICE, dtype=torch.float32, backend="torch")
    return model, model.encode_queries(QUERY_TEXTS), model.encode_documents(DOC_TEXTS)


@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_encoder_matches_torch_path(stanford_dir, reference, dtype):
    ref_model, ref_q, ref_d = reference
    model = ColBERT.from_pretrained(stanford_dir, device=KERNEL_DEVICE, dtype=dtype, backend="triton")
    q = model.encode_queries(QUERY_TEXTS)
    d = model.encode_documents(DOC_TEXTS)
    for ours, ref in zip(q + d, ref_q + ref_d):
        assert ours.shape == ref.shape and ours.dtype == dtype
        assert torch.isfinite(ours).all()
        cosine = torch.nn.functional.cosine_similarity(ours.float(), ref, dim=-1)
        assert float(cosine.min()) >= 0.9999
        if dtype == torch.float32:
            # Same math in the same precision: fp32 rounding apart, so an approximation in a
            # kernel (tanh GELU, a TF32 dot) shows here while it passes the cosine bound.
            torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
    # Ranking unchanged: every query's document order is the reference's, up to near-ties.
    ref_scores = ref_model.score(ref_q, ref_d)
    ours_scores = model.score([x.float() for x in q], [x.float() for x in d])
    for ref_row, our_row in zip(ref_scores, ours_scores):
        order = torch.sort(our_row, descending=True, stable=True).indices
        in_ref_order = ref_row[order]
        assert bool((in_ref_order[:-1] >= in_ref_order[1:] - 2e-3).all())
