"""The packed encoder against transformers.BertModel on the same real weights."""

import pytest
import torch
from checkpoints import OTHER_HEAD_DIMS, build_stanford
from conftest import require_reference
from texts import DOCUMENTS, QUERIES

from colbert_triton.model.encoder import encode_hidden
from colbert_triton.model.ops import PackedBatch, TorchOps


def _hf_model(path):
    transformers = require_reference("transformers")
    return transformers.BertModel.from_pretrained(str(path), attn_implementation="eager").eval()


def _compare(model, hf, tokens):
    batch = PackedBatch.from_sequences(tokens.sequences, tokens.key_lens, "cpu")
    with torch.inference_mode():
        ours = encode_hidden(model.weights, batch, TorchOps())
        ids = torch.nn.utils.rnn.pad_sequence([torch.from_numpy(s) for s in tokens.sequences],
                                              batch_first=True)
        length = ids.shape[1]
        attention = (torch.arange(length)[None, :] < torch.from_numpy(tokens.key_lens)[:, None]).long()
        ref = hf(input_ids=ids, attention_mask=attention,
                 token_type_ids=torch.zeros_like(ids)).last_hidden_state
    starts = batch.cu_seqlens.tolist()
    for i, n in enumerate(batch.seq_lens_host):
        torch.testing.assert_close(ours[starts[i] : starts[i] + n], ref[i, :n], atol=2e-5, rtol=1e-5)


def test_encoder_matches_bert_model_documents(model, stanford_dir):
    _compare(model, _hf_model(stanford_dir), model.tokenizer.documents(DOCUMENTS))


def test_encoder_matches_bert_model_queries_with_unattended_mask_rows(model, stanford_dir):
    tokens = model.tokenizer.queries(QUERIES)
    assert (tokens.key_lens < 32).any()  # [MASK] rows that are computed but not attended to
    _compare(model, _hf_model(stanford_dir), tokens)


def test_deep_checkpoint_matches(tmp_path):
    from checkpoints import build_stanford

    from colbert_triton import ColBERT

    path = build_stanford(tmp_path / "deep", num_layers=12, dim=128)
    model = ColBERT.from_pretrained(path, device="cpu")
    _compare(model, _hf_model(path), model.tokenizer.documents(DOCUMENTS[:6]))


@pytest.mark.parametrize("width", OTHER_HEAD_DIMS)
def test_other_bert_shapes_match(tmp_path, width):
    """Head dims 16, 64 and 128 with their hidden and FFN widths, read from the config."""
    from colbert_triton import ColBERT

    path = build_stanford(tmp_path / width, num_layers=2, dim=128, width=OTHER_HEAD_DIMS[width])
    model = ColBERT.from_pretrained(path, device="cpu")
    _compare(model, _hf_model(path), model.tokenizer.documents(DOCUMENTS[:6]))
    _compare(model, _hf_model(path), model.tokenizer.queries(QUERIES[:4]))


def test_layer_norm_eps_comes_from_the_config(tmp_path):
    """Every other checkpoint is MiniLM with BERT's 1e-12: a hard-coded epsilon would pass them
    all (a mutation test found it), and a BERT variant with 1e-5 would encode wrongly."""
    import json

    from checkpoints import build_stanford

    from colbert_triton import ColBERT

    path = build_stanford(tmp_path / "eps")
    config = json.loads((path / "config.json").read_text())
    config["layer_norm_eps"] = 1e-3
    (path / "config.json").write_text(json.dumps(config))
    model = ColBERT.from_pretrained(path, device="cpu")
    _compare(model, _hf_model(path), model.tokenizer.documents(DOCUMENTS[:3]))
