"""The command line: ranking as JSONL, encoding to safetensors, and its errors."""

import json

import pytest
import torch
from safetensors import safe_open

from colbert_triton import ColBERT
from colbert_triton.cli import main


@pytest.fixture
def docs_file(tmp_path):
    path = tmp_path / "docs.jsonl"
    records = [{"id": "eiffel", "text": "The Eiffel Tower is in Paris."},
               {"id": "banana", "text": "Bananas are a yellow fruit."},
               {"id": "colbert", "text": "ColBERT scores documents with late interaction."}]
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return path


def test_rank_prints_topk_jsonl(stanford_dir, docs_file, tmp_path, capsys, model):
    queries = tmp_path / "queries.txt"
    queries.write_text("where is the eiffel tower\n\nyellow fruit\n")
    code = main(["rank", "--model", str(stanford_dir), "--device", "cpu", "--documents", str(docs_file),
                 "--queries", str(queries), "-k", "2", "--no-progress"])
    assert code == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["query_id"] for line in lines] == [0, 2]  # line numbers: the blank line keeps its
    assert lines[1]["query"] == "yellow fruit"
    texts = [json.loads(r)["text"] for r in docs_file.read_text().splitlines()]
    for line in lines:
        assert [r["rank"] for r in line["results"]] == [1, 2]
        scores = model.score(model.encode_queries([line["query"]]), model.encode_documents(texts))[0]
        best = torch.sort(scores, descending=True, stable=True).indices[:2].tolist()
        assert [r["id"] for r in line["results"]] == [["eiffel", "banana", "colbert"][i] for i in best]
        assert [r["score"] for r in line["results"]] == pytest.approx(scores[best].tolist(), abs=1e-5)


def test_rank_with_inline_queries(stanford_dir, docs_file, capsys):
    assert main(["rank", "--model", str(stanford_dir), "--device", "cpu", "--documents", str(docs_file),
                 "--query", "paris", "--query", "fruit", "-k", "10"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(lines) == 2 and len(lines[0]["results"]) == 3


def test_encode_writes_packed_embeddings(stanford_dir, docs_file, tmp_path, model, monkeypatch):
    out = tmp_path / "emb.safetensors"
    asked = []  # where the encoder's output goes: the host, whatever the model's device
    for kind in ("encode_documents", "encode_queries"):
        encode = getattr(ColBERT, kind)
        monkeypatch.setattr(ColBERT, kind, lambda self, *args, encode=encode, **kwargs:
                            asked.append(kwargs.get("output_device")) or encode(self, *args, **kwargs))
    assert main(["encode", "--model", str(stanford_dir), "--device", "cpu", "--input", str(docs_file),
                 "--output", str(out)]) == 0
    assert main(["encode", "--model", str(stanford_dir), "--device", "cpu", "--input", str(docs_file),
                 "--output", str(tmp_path / "queries.safetensors"), "--kind", "queries"]) == 0
    assert asked == ["cpu", "cpu"]
    with safe_open(str(out), "pt") as f:
        values, offsets = f.get_tensor("values"), f.get_tensor("offsets")
        ids = json.loads(bytes(f.get_tensor("ids_json").numpy()))
    assert ids == ["eiffel", "banana", "colbert"]
    texts = [json.loads(r)["text"] for r in docs_file.read_text().splitlines()]
    expected = model.encode_documents(texts)
    assert offsets.tolist()[-1] == values.shape[0] == sum(len(e) for e in expected)
    torch.testing.assert_close(values, torch.cat(expected))


@pytest.mark.parametrize("content, message", [
    (None, "not found"),
    ("", "no documents"),
    ('{"text": "ok"}\n{broken\n', "docs.jsonl:2: invalid JSON"),
    ('{"id": 1}\n', 'string "text" field'),
    # Python's json reads these; JSON has no such values (the results would hold them).
    ('{"text": "ok"}\n{"id": NaN, "text": "x"}\n', "docs.jsonl:2: NaN is not a JSON value"),
    ('{"id": [-Infinity], "text": "x"}\n', "docs.jsonl:1: -Infinity is not a JSON value"),
    # Legal JSON that Python reads as inf: 1e400 and 2e400 would be one id, written as Infinity.
    ('{"id": 1e400, "text": "x"}\n', "docs.jsonl:1: 1e400 is outside the range of a float"),
    ('{"text": "ok"}\n{"id": {"a": -2E+999}, "text": "x"}\n', "docs.jsonl:2: -2E+999 is outside"),
    ('{"id": ' + "[" * 100_000 + "]" * 100_000 + ', "text": "x"}\n', "docs.jsonl:1: JSON nested too deeply"),
    (b'{"text": "caf\xe9"}\n', "docs.jsonl: not UTF-8 text"),  # Latin-1
])
def test_input_errors(stanford_dir, tmp_path, capsys, content, message):
    path = tmp_path / "docs.jsonl"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    code = main(["rank", "--model", str(stanford_dir), "--device", "cpu", "--documents", str(path),
                 "--query", "x"])
    assert code == 2
    assert message in capsys.readouterr().err


def test_model_errors(tmp_path, docs_file, capsys):
    code = main(["rank", "--model", str(tmp_path / "nothing"), "--documents", str(docs_file), "--query", "x"])
    assert code == 2 and "no such checkpoint directory" in capsys.readouterr().err
    code = main(["encode", "--model", str(tmp_path), "--input", str(docs_file), "--output", str(tmp_path / "o.safetensors")])
    assert code == 2 and "config.json" in capsys.readouterr().err


def test_ids_are_line_numbers(stanford_dir, tmp_path, capsys):
    """.txt ids are line numbers from 0 (blank lines skipped, not renumbered); a JSONL record
    without an id gets its line number."""
    docs = tmp_path / "docs.txt"
    docs.write_text("bananas are yellow\n\nthe eiffel tower is in paris\n")
    assert main(["rank", "--model", str(stanford_dir), "--device", "cpu", "--backend", "torch",
                 "--documents", str(docs), "--query", "eiffel tower paris", "-k", "1", "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out)["results"][0]["id"] == 2
    records = tmp_path / "docs.jsonl"
    records.write_text('{"text": "bananas are yellow"}\n\n{"text": "the eiffel tower is in paris"}\n')
    assert main(["rank", "--model", str(stanford_dir), "--device", "cpu", "--documents", str(records),
                 "--query", "eiffel tower paris", "-k", "1", "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out)["results"][0]["id"] == 2


def test_argument_errors_are_one_line(stanford_dir, docs_file, tmp_path, capsys):
    code = main(["rank", "--model", str(stanford_dir), "--device", "gpu", "--documents", str(docs_file),
                 "--query", "x"])
    assert code == 2 and "device must be like" in capsys.readouterr().err
    code = main(["rank", "--model", str(stanford_dir), "--device", "meta", "--documents", str(docs_file),
                 "--query", "x"])
    assert code == 2 and "a CPU or a CUDA device" in capsys.readouterr().err
    code = main(["encode", "--model", str(stanford_dir), "--device", "cpu", "--input", str(docs_file),
                 "--output", str(tmp_path)])
    assert code == 2 and "is a directory" in capsys.readouterr().err
    code = main(["rank", "--model", str(stanford_dir), "--device", "cpu", "--documents", str(docs_file),
                 "--query", "x", "-k", "0"])
    assert code == 2 and "-k must be at least 1" in capsys.readouterr().err


def test_txt_lines_end_at_newlines_only(stanford_dir, tmp_path, capsys):
    """Ids are line numbers as `wc -l` counts them: a form feed (pdftotext), U+2028, U+0085 or a
    lone CR inside a line keep it one line; CRLF lines lose their CR; a BOM is not text."""
    from colbert_triton.cli import read_texts

    docs = tmp_path / "seps.txt"
    docs.write_bytes("alpha\u2028beta\nsecond\fformfeed\x1cx\nthird\x85nel\rcr\nhello there\n".encode())
    assert read_texts(str(docs), "documents") == (
        [0, 1, 2, 3], ["alpha\u2028beta", "second\fformfeed\x1cx", "third\x85nel\rcr", "hello there"])
    crlf = tmp_path / "crlf.txt"
    crlf.write_bytes(b"\xef\xbb\xbffirst\r\n\r\nsecond\r\n")
    assert read_texts(str(crlf), "documents") == ([0, 2], ["first", "second"])
    # The reviewer's command: the fourth line is id 3.
    assert main(["rank", "--model", str(stanford_dir), "--device", "cpu", "--documents", str(docs),
                 "--query", "hello there", "-k", "1", "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out)["results"][0]["id"] == 3


def test_jsonl_strings_may_hold_unicode_line_separators(tmp_path):
    """json.dumps(..., ensure_ascii=False) writes U+2028, U+2029 and U+0085 raw: still one line."""
    from colbert_triton.cli import read_texts

    texts = ["a\u2028b", "c\u2029d", "e\x85f", "g\fh"]
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts), encoding="utf-8")
    assert read_texts(str(path), "documents") == ([0, 1, 2, 3], texts)


def test_jsonl_with_a_bom_and_an_upper_case_suffix(tmp_path):
    from colbert_triton.cli import read_texts

    path = tmp_path / "docs.JSONL"
    path.write_bytes(b'\xef\xbb\xbf{"id": "a", "text": "first"}\r\n{"text": "second"}\r\n')
    assert read_texts(str(path), "documents") == (["a", 1], ["first", "second"])


@pytest.mark.parametrize("lines, message", [
    # An explicit id and a line without one that gets the same id (its line number from 0).
    (['{"id": 1, "text": "a"}', '{"text": "b"}'],
     'dup.jsonl: duplicate id 1 on lines 1 and 2 (lines counted from 1; a line without an "id"'),
    (['{"text": "a"}', '{"text": "b"}', '{"id": 0, "text": "c"}'], "dup.jsonl: duplicate id 0 on lines 1 and 3"),
    (['{"id": "x", "text": "a"}', "", '{"id": "x", "text": "b"}'], 'dup.jsonl: duplicate id "x" on lines 1 and 3'),
    (['{"id": 2, "text": "a"}', '{"id": 2.0, "text": "b"}'], "dup.jsonl: duplicate id 2.0 on lines 1 and 2"),
    (['{"id": [1, {"a": 1, "b": 2}], "text": "a"}', '{"id": [1, {"b": 2, "a": 1}], "text": "b"}'],
     "dup.jsonl: duplicate id [1, {"),
])
def test_duplicate_jsonl_ids_are_an_error(tmp_path, capsys, monkeypatch, lines, message):
    from colbert_triton import cli

    monkeypatch.setattr(cli, "_load_model", lambda args: pytest.fail("model loaded first"))
    path = tmp_path / "dup.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(cli.InputError) as error:
        cli.read_texts(str(path), "documents")
    assert str(error.value).startswith(f"{tmp_path}/{message}")
    explicit_only = all('"id"' in line for line in lines if line)
    assert ("line without" in str(error.value)) != explicit_only
    docs = tmp_path / "docs.txt"
    docs.write_text("a document\n")
    for args in (["--documents", str(path), "--query", "x"], ["--documents", str(docs), "--queries", str(path)]):
        assert main(["rank", *args]) == 2
        assert message in capsys.readouterr().err


def test_distinct_json_ids_are_not_duplicates(tmp_path):
    from colbert_triton.cli import read_texts

    path = tmp_path / "docs.jsonl"
    path.write_text('{"id": true, "text": "a"}\n{"id": 1, "text": "b"}\n{"id": "1", "text": "c"}\n'
                    '{"id": [1], "text": "d"}\n{"id": "[1]", "text": "e"}\n{"id": null, "text": "f"}\n')
    assert read_texts(str(path), "documents")[0] == [True, 1, "1", [1], "[1]", None]


def test_jsonl_lines_of_whitespace_are_blank_lines(tmp_path):
    """A JSONL line of spaces and tabs is skipped as an empty one is, and keeps its number: it is
    not 'invalid JSON'."""
    from colbert_triton.cli import read_texts

    path = tmp_path / "docs.jsonl"
    path.write_text('{"text": "first"}\n  \t \n{"text": "second"}\n')
    assert read_texts(str(path), "documents") == ([0, 2], ["first", "second"])


def test_inline_queries_are_numbered_from_zero(stanford_dir, docs_file, capsys):
    """A --query's query_id is its position from 0, in the order given."""
    assert main(["rank", "--model", str(stanford_dir), "--device", "cpu", "--documents", str(docs_file),
                 "--query", "paris", "--query", "fruit", "--no-progress"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(line["query_id"], line["query"]) for line in lines] == [(0, "paris"), (1, "fruit")]


def test_top_k_defaults_to_ten(stanford_dir, tmp_path, capsys):
    """Without -k, rank lists the best 10 documents of a larger corpus."""
    docs = tmp_path / "docs.txt"
    docs.write_text("".join(f"document number {i} about topic {i % 3}\n" for i in range(12)))
    assert main(["rank", "--model", str(stanford_dir), "--device", "cpu", "--documents", str(docs),
                 "--query", "topic", "--no-progress"]) == 0
    results = json.loads(capsys.readouterr().out)["results"]
    assert [r["rank"] for r in results] == list(range(1, 11))
    assert len({r["id"] for r in results}) == 10


def test_encode_output_suffix_in_any_case(stanford_dir, tmp_path, capsys):
    """rank takes a .safetensors corpus by its suffix in any case, so encode writes one whatever the
    suffix's case."""
    docs = tmp_path / "docs.txt"
    docs.write_text("The Eiffel Tower is in Paris.\nBananas are yellow.\n")
    common = ["--model", str(stanford_dir), "--device", "cpu", "--no-progress"]
    encoded = tmp_path / "docs.SafeTensors"
    assert main(["encode", *common, "--input", str(docs), "--output", str(encoded)]) == 0
    assert encoded.is_file()
    assert main(["rank", *common, "--documents", str(encoded), "--query", "paris", "-k", "1"]) == 0
    assert json.loads(capsys.readouterr().out)["results"][0]["id"] in (0, 1)
