"""``colbert-triton``: rank documents for queries, or write embeddings to a file.

    colbert-triton rank --documents docs.jsonl --queries queries.txt -k 5 > results.jsonl
    colbert-triton rank --documents docs.txt --query "what is late interaction?"
    colbert-triton encode --input docs.txt --kind documents --output docs.safetensors
    colbert-triton rank --documents docs.safetensors --queries queries.txt   # encoded once

Inputs are text files with one text per line (ids are line numbers, from 0; blank lines are
skipped but keep their numbers; lines end at "\\n" only) or JSONL files with an ``id`` and a
``text`` per line (ids default to line numbers, from 0; two lines with one id are an error);
``rank`` also takes the documents as a ``.safetensors`` file written by ``encode`` (checked to
come from the same model). ``rank`` prints one JSON line per query:
``{"query_id", "query", "results": [{"rank", "id", "score"}, ...]}``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from .model.checkpoint import DEFAULT_MODEL, CheckpointError
from .model.pooling import check_pooling
from .packed import check_output_path, embeddings_file_info


class InputError(ValueError):
    pass


def read_texts(path: str, what: str) -> tuple[list, list[str]]:
    """(ids, texts) from a .jsonl file (objects with "text" and optional "id") or a text file."""
    file = Path(path)
    if not file.is_file():
        raise InputError(f"{what} file not found: {path}")
    lines = _read_lines(file, path)
    if file.suffix.lower() == ".jsonl":
        ids, texts = _read_jsonl(lines, path)
    else:
        numbered = [(number, line) for number, line in enumerate(lines) if line.strip()]
        ids, texts = [n for n, _ in numbered], [line for _, line in numbered]
    if not texts:
        raise InputError(f"{path}: no {what} in the file")
    return ids, texts


def _read_lines(file: Path, path: str) -> list[str]:
    """The file's lines, split at line feeds only: ids are line numbers as `wc -l`, `grep -n`
    and editors count them, so a form feed (pdftotext writes them), U+2028 or U+0085 inside a
    line does not split it (str.splitlines would), nor does a lone carriage return (the bytes
    are decoded without newline translation). A CRLF line loses its CR; a leading UTF-8 BOM
    is dropped."""
    try:
        text = file.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError:
        raise InputError(f"{path}: not UTF-8 text") from None
    lines = text.split("\n")
    if lines[-1] == "":  # the final newline ends the last line; it does not start another
        lines.pop()
    return [line.removesuffix("\r") for line in lines]


def _read_jsonl(lines: list[str], path: str) -> tuple[list, list[str]]:
    ids, texts, first_line = [], [], {}
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line, parse_constant=_not_json, parse_float=_finite_float)
        except json.JSONDecodeError as bad:
            raise InputError(f"{path}:{number}: invalid JSON ({bad.msg})") from None
        except ValueError as bad:
            raise InputError(f"{path}:{number}: {bad}") from None
        except RecursionError:
            raise InputError(f"{path}:{number}: JSON nested too deeply") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise InputError(f'{path}:{number}: expected an object with a string "text" field')
        id_ = record.get("id", number - 1)
        # Results name documents by id only: two lines with one id could not be told apart.
        seen = first_line.setdefault(_id_key(id_), (number, "id" in record))
        if seen[0] != number:
            note = "" if seen[1] and "id" in record else (
                ' (lines counted from 1; a line without an "id" has its line number from 0 as id)')
            raise InputError(f"{path}: duplicate id {json.dumps(id_)} on lines {seen[0]} and {number}{note}")
        ids.append(id_)
        texts.append(record["text"])
    return ids, texts


def _not_json(constant: str):
    """Python's json reads NaN and Infinity; JSON has no such values (an id of NaN would be
    written to the results as no JSON reader takes it)."""
    raise ValueError(f"{constant} is not a JSON value")


def _finite_float(text: str) -> float:
    """A JSON number past float range (1e400) is legal JSON that Python reads as inf: refused
    like Infinity, or two such ids would be one and results would carry Infinity."""
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is outside the range of a float")
    return value


def _id_key(id_):
    """What makes two JSON ids the same: 1 and 1.0 are one number (JavaScript and Python dict
    keys cannot tell them apart), true is not 1 (JSON has booleans), lists and objects go by
    their content."""
    if isinstance(id_, (list, dict)):
        return ("json", json.dumps(id_, sort_keys=True))
    return ("bool", id_) if isinstance(id_, bool) else id_


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL, help="hub id or local checkpoint directory")
    parser.add_argument("--revision", default=None, help="hub revision (branch, tag or commit)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    parser.add_argument("--dtype", default=None, help="float32, float16 or bfloat16")
    parser.add_argument("--backend", choices=("torch", "triton"), default=None,
                        help="ops for encoding and scoring (default: torch; triton needs CUDA)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--query-maxlen", type=int, default=None)
    parser.add_argument("--doc-maxlen", type=int, default=None)
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="colbert-triton", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    rank = commands.add_parser("rank", help="top-k documents per query, as JSONL")
    _add_model_args(rank)
    rank.add_argument("--documents", required=True,
                      help="documents: .txt (one per line), .jsonl, or .safetensors from `encode`")
    source = rank.add_mutually_exclusive_group(required=True)
    source.add_argument("--queries", help="queries: .txt (one per line) or .jsonl")
    source.add_argument("--query", action="append", help="a query text (repeatable)")
    rank.add_argument("-k", "--top-k", type=int, default=10)
    encode = commands.add_parser("encode", help="write embeddings to a safetensors file")
    _add_model_args(encode)
    encode.add_argument("--input", required=True, help=".txt (one per line) or .jsonl")
    encode.add_argument("--kind", choices=("documents", "queries"), default="documents")
    encode.add_argument("--output", required=True, help="output .safetensors path")
    encode.add_argument("--pool-factor", type=int, default=1, metavar="N",
                        help="pool each document's rows into about 1/N as many, as PyLate's "
                             "pool_factor (needs SciPy; documents only)")
    encode.add_argument("--protected-tokens", type=int, default=1, metavar="M",
                        help="the first M rows of each document are left out of pooling (default 1: [CLS])")
    encode.add_argument("--pooling-processes", type=int, default=0, metavar="P",
                        help="pool in P worker processes (default 0: in this one; pooling, not the "
                             "encoder, bounds a pooled corpus's encoding)")
    return parser


def _load_model(args):
    from .model.colbert import ColBERT

    return ColBERT.from_pretrained(args.model, revision=args.revision, device=args.device,
                                   dtype=args.dtype, query_maxlen=args.query_maxlen,
                                   doc_maxlen=args.doc_maxlen, backend=args.backend)


def _rank(args, out) -> None:
    if args.top_k < 1:
        raise InputError("-k must be at least 1")
    encoded_corpus = Path(args.documents).suffix.lower() == ".safetensors"
    if encoded_corpus:
        if not Path(args.documents).is_file():
            raise InputError(f"documents file not found: {args.documents}")
        embeddings_file_info(args.documents)  # not an embeddings file: say so before the model loads
    else:
        doc_ids, docs = read_texts(args.documents, "documents")
    if args.queries:
        query_ids, queries = read_texts(args.queries, "queries")
    else:
        query_ids, queries = list(range(len(args.query))), args.query
    model = _load_model(args)
    progress = False if args.no_progress else None
    if encoded_corpus:
        corpus, doc_ids, _ = model.load_embeddings(args.documents, kind="documents", device="cpu")
        if _fits_on_device(corpus.values.numel() * corpus.values.element_size(), model.device):
            corpus = corpus.to(model.device)
        else:
            print(f"colbert-triton: the corpus ({corpus.values.shape[0]} vectors) stays in host memory "
                  f"and is streamed to {model.device} for the search", file=sys.stderr)
    else:
        # A corpus that may not fit on the GPU is kept in host memory as it is encoded and
        # streamed to the GPU for the search, as a saved corpus is. Its size is estimated from
        # its characters, at 2 a word piece: English runs ~4.5 (kept on the GPU up to about twice
        # what the estimate allows), Chinese or Japanese 1 (the estimate half the truth, against
        # a budget of half the free memory).
        tokens = sum(min(len(text) // 2 + 4, model.settings.doc_maxlen) for text in docs)
        on_host = not _fits_on_device(tokens * model.dim * model.dtype.itemsize, model.device)
        corpus = model.encode_documents(docs, args.batch_size, packed=True, show_progress=progress,
                                        output_device="cpu" if on_host else None)
        if on_host:
            print(f"colbert-triton: the corpus ({len(docs)} documents) is kept in host memory as it is "
                  f"encoded and streamed to {model.device} for the search", file=sys.stderr)
    encoded = model.encode_queries(queries, args.batch_size, show_progress=progress)
    scores, indices = model.search(encoded, corpus, k=args.top_k)
    for qi, (qid, text) in enumerate(zip(query_ids, queries)):
        results = [{"rank": r + 1, "id": doc_ids[i], "score": round(s, 6)}
                   for r, (i, s) in enumerate(zip(indices[qi].tolist(), scores[qi].tolist()))]
        out.write(json.dumps({"query_id": qid, "query": text, "results": results}) + "\n")


def _fits_on_device(num_bytes: int, device) -> bool:
    """Whether a corpus of ``num_bytes`` should move to ``device``: always off CUDA; on CUDA if
    it takes at most half the free memory (the rest is for the queries and the scoring)."""
    import torch

    if device.type != "cuda":
        return True
    free, _ = torch.cuda.mem_get_info(device)
    return num_bytes <= free // 2


def _encode(args) -> None:
    ids, texts = read_texts(args.input, args.kind)
    output = Path(args.output)
    # Both before the model is loaded and the texts encoded.
    check_output_path(output)
    if output.suffix.lower() != ".safetensors":  # `rank` takes the corpus by that suffix
        raise InputError(f"--output must be a .safetensors file, got {args.output}")
    show_progress = False if args.no_progress else None
    metadata = {}
    if args.kind == "documents":
        pool_factor, protected_tokens, processes = check_pooling(
            args.pool_factor, args.protected_tokens, args.pooling_processes)
        model = _load_model(args)
        # On the host as it is encoded, and written from the list of items (views into the
        # encoded batches) without joining them: a corpus need fit neither in the GPU's memory
        # nor twice in the host's.
        try:
            items = model.encode_documents(texts, args.batch_size, show_progress=show_progress,
                                           pool_factor=pool_factor, protected_tokens=protected_tokens,
                                           pooling_processes=processes, output_device="cpu")
        except ImportError as error:  # SciPy missing where the model pools on the host: said in one line
            raise InputError(str(error)) from None
        if pool_factor > 1:  # what a reader of the file cannot tell from its rows
            metadata = {"pool_factor": str(pool_factor), "protected_tokens": str(protected_tokens)}
    else:
        if args.pool_factor != 1:  # PyLate ignores pool_factor for queries: a user asking meant something else
            raise InputError("--pool-factor pools documents; queries are never pooled")
        model = _load_model(args)
        items = model.encode_queries(texts, args.batch_size, show_progress=show_progress, output_device="cpu")
    model.save_embeddings(output, items, ids=ids, kind=args.kind, metadata=metadata)
    print(f"wrote {len(texts)} {args.kind} ({sum(len(item) for item in items)} vectors of dim {model.dim}) "
          f"to {output}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "rank":
            _rank(args, sys.stdout)
        else:
            _encode(args)
    except (InputError, CheckpointError, ValueError) as error:
        print(f"colbert-triton: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
