"""`mixtral-run preprocess`: text, JSONL, Parquet or Alpaca records -> a Megatron-LM indexed dataset (P.bin + P.idx).

Documents: `text` files hold one document per paragraph block (blocks separated by blank lines); `jsonl` holds one
JSON object per line (or a JSON array) whose `--text-key` field is a document; `parquet` the `--text-key` column;
`alpaca` records' instruction/input/output joined into one prompt-and-response document. Every document starts with
BOS (and ends with EOS with --append-eos); empty documents are skipped. Without --format it follows the suffix
(.jsonl/.json -> jsonl, .parquet -> parquet, anything else -> text).
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from mixtral.errors import MixtralError

FORMATS = ("text", "jsonl", "parquet", "alpaca")
if TYPE_CHECKING:
    import numpy as np

BATCH_DOCS = 256
PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", nargs="+", required=True, metavar="FILE", help="input files, read in order")
    parser.add_argument("--output-prefix", required=True, metavar="P", help="writes P.bin and P.idx")
    parser.add_argument("--tokenizer", default=None, metavar="PATH",
                        help="SentencePiece model or model directory (default: Mixtral's tokenizer)")
    parser.add_argument("--format", default=None, help=f"one of {', '.join(FORMATS)} (default: from the suffix)")
    parser.add_argument("--text-key", default="text", help="JSON key / Parquet column of the text (default: text)")
    parser.add_argument("--append-eos", action="store_true", help="end every document with EOS")
    parser.add_argument("--workers", type=int, default=1, help="tokenizer processes (default: 1)")


def run(args: argparse.Namespace) -> int:
    if args.workers < 1:
        raise MixtralError(f"--workers must be at least 1, got {args.workers}")
    if args.format is not None and args.format not in FORMATS:
        raise MixtralError(f"unknown --format {args.format!r}; choose one of {', '.join(FORMATS)}")
    inputs = [Path(p) for p in args.input]
    for path in inputs:
        if not path.is_file():
            raise MixtralError(f"input file {path} does not exist; check the --input paths")
    texts = itertools.chain.from_iterable(
        read_documents(path, args.format or infer_format(path), args.text_key) for path in inputs)
    docs, tokens, dtype = tokenize_to_indexed(texts, args.output_prefix, args.tokenizer, args.append_eos, args.workers)
    print(f"wrote {args.output_prefix}.bin and .idx: {docs} documents, {tokens} tokens ({dtype})")
    return 0


def infer_format(path: Path) -> str:
    return {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}.get(path.suffix.lower(), "text")


def read_documents(path: Path, fmt: str, text_key: str = "text") -> Iterator[str]:
    """The document texts of one input file."""
    if fmt == "text":
        return read_text(path)
    if fmt == "parquet":
        return read_parquet(path, text_key)
    if fmt == "alpaca":
        return (alpaca_document(record, where) for where, record in read_records(path))
    return (field(record, text_key, where) for where, record in read_records(path))


def read_text(path: Path) -> Iterator[str]:
    """Paragraph blocks, streamed: a blank line ends a document."""
    block: list[str] = []
    with open(path, encoding="utf-8") as f:
        for line in itertools.chain(f, [""]):
            if line.strip():
                block.append(line)
            elif block:
                yield "".join(block).strip("\n")
                block = []


def read_records(path: Path) -> Iterator[tuple[str, dict]]:
    """(location, object) pairs from a JSON-lines file or a file holding one JSON array of objects."""
    with open(path, encoding="utf-8") as f:
        head = f.read(4096).lstrip()
        f.seek(0)
        try:
            if head.startswith("["):
                records = enumerate(json.load(f))
                yield from ((f"{path} record {i}", r) for i, r in records)
                return
            for number, line in enumerate(f, 1):
                if line.strip():
                    yield f"{path}:{number}", json.loads(line)
        except json.JSONDecodeError as exc:
            raise MixtralError(f"{path} is not valid JSON lines ({exc}); use --format text for plain text") from None


def field(record: dict, key: str, where: str) -> str:
    if not isinstance(record, dict) or key not in record:
        keys = ", ".join(record) if isinstance(record, dict) else type(record).__name__
        raise MixtralError(f"{where}: no key {key!r} (found: {keys}); pass the right --text-key")
    value = record[key]
    if value is None:
        return ""
    if not isinstance(value, str):
        raise MixtralError(f"{where}: {key!r} is a {type(value).__name__}, not text; pass the right --text-key")
    return value


def alpaca_document(record: dict, where: str) -> str:
    """Stanford Alpaca's prompt layout; the Input section is left out when the record has none."""
    instruction, output = field(record, "instruction", where), field(record, "output", where)
    extra = field(record, "input", where) if "input" in record else ""
    parts = [f"### Instruction:\n{instruction}"]
    if extra.strip():
        parts.append(f"### Input:\n{extra}")
    parts.append(f"### Response:\n{output}")
    return "\n\n".join(parts)


def read_parquet(path: Path, text_key: str) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise MixtralError("reading parquet needs pyarrow: pip install pyarrow") from None
    parquet = pq.ParquetFile(path)
    if text_key not in parquet.schema_arrow.names:
        raise MixtralError(f"{path}: no column {text_key!r} (found: {', '.join(parquet.schema_arrow.names)}); "
                           "pass the right --text-key")
    for batch in parquet.iter_batches(columns=[text_key]):
        yield from (text or "" for text in batch.column(0).to_pylist())


def batched(texts: Iterable[str], size: int) -> Iterator[list[str]]:
    iterator = iter(texts)
    while batch := list(itertools.islice(iterator, size)):
        yield batch


def _init_worker(tokenizer: str | None) -> None:
    from mixtral.data.tokenizer import load_tokenizer

    load_tokenizer(tokenizer)


def encode_documents(job: tuple[list[str], str | None, bool]) -> list[np.ndarray]:
    """BOS + tokens (+ EOS) of every non-empty text in a batch (runs in a worker process)."""
    import numpy as np

    from mixtral.data.tokenizer import load_tokenizer

    texts, tokenizer, append_eos = job
    tok = load_tokenizer(tokenizer)
    texts = [t for t in texts if t.strip()]
    tail = [tok.eos_id] if append_eos else []
    return [np.array([tok.bos_id, *ids, *tail], dtype=np.int32) for ids in tok.encode_batch(texts)]


def tokenize_to_indexed(texts: Iterable[str], prefix: str | Path, tokenizer: str | None = None,
                        append_eos: bool = False, workers: int = 1, progress: bool = True) -> tuple[int, int, str]:
    """Tokenize texts (in order) into the indexed dataset at prefix; returns (documents, tokens, dtype)."""
    from multiprocessing import Pool

    from tqdm import tqdm

    from mixtral.data.indexed import IndexedDatasetWriter, optimal_dtype
    from mixtral.data.tokenizer import load_tokenizer

    tokenizer = str(tokenizer) if tokenizer else None
    dtype = optimal_dtype(load_tokenizer(tokenizer).vocab_size)
    jobs = ((batch, tokenizer, append_eos) for batch in batched(texts, BATCH_DOCS))
    pool = Pool(workers, initializer=_init_worker, initargs=(tokenizer,)) if workers > 1 else None
    bar = tqdm(unit="doc", disable=not progress, file=sys.stderr, desc=str(prefix))
    try:
        with IndexedDatasetWriter(prefix, dtype) as writer:
            for docs in pool.imap(encode_documents, jobs) if pool else map(encode_documents, jobs):
                for doc in docs:
                    writer.add_document(doc)
                bar.update(len(docs))
                bar.set_postfix_str(f"{writer.num_tokens / max(bar.format_dict['elapsed'], 1e-9):,.0f} tok/s",
                                    refresh=False)
    finally:
        bar.close()
        if pool:
            pool.terminate()
    return len(writer.lengths), writer.num_tokens, dtype.name
