"""`mixtral-run preprocess`: text, JSONL, Parquet or Alpaca records -> a Megatron-LM indexed dataset (P.bin + P.idx).

Documents: `text` files hold one document per paragraph block (blocks separated by blank lines); `jsonl` holds one
JSON object per line (or a JSON array) whose `--text-key` field is a document; `parquet` the `--text-key` column;
`alpaca` records' instruction/input/output joined into one prompt-and-response document, read from JSON, JSON lines
or Parquet. Every document starts with BOS (and ends with EOS with --append-eos); empty documents are skipped.
Without --format it follows the suffix (.jsonl/.json -> jsonl, .parquet -> parquet, anything else -> text); a
trailing .gz (C4's .json.gz files) is decompressed on the fly. Parquet needs pyarrow (`pip install
'mixtral-run[data]'`).
"""

from __future__ import annotations

import argparse
import gzip
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
    parser.add_argument(
        "--tokenizer",
        default=None,
        metavar="PATH",
        help="SentencePiece model or model directory (default: Mixtral's tokenizer)",
    )
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
        read_documents(path, args.format or infer_format(path), args.text_key) for path in inputs
    )
    docs, tokens, dtype = tokenize_to_indexed(texts, args.output_prefix, args.tokenizer, args.append_eos, args.workers)
    print(f"wrote {args.output_prefix}.bin and .idx: {docs} documents, {tokens} tokens ({dtype})")
    return 0


def suffix(path: Path) -> str:
    """The suffix that names the container: .jsonl for data.jsonl.gz."""
    suffixes = [s.lower() for s in path.suffixes]
    return suffixes[-2] if suffixes[-1:] == [".gz"] and len(suffixes) > 1 else path.suffix.lower()


def infer_format(path: Path) -> str:
    return {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}.get(suffix(path), "text")


def open_text(path: Path):
    """The file as text, gunzipped when it ends in .gz."""
    if path.suffix.lower() == ".gz":
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def read_documents(path: Path, fmt: str, text_key: str = "text") -> Iterator[str]:
    """The document texts of one input file; one that cannot be decoded fails with a one-line error."""
    try:
        if fmt == "text":
            yield from read_text(path)
            return
        records = read_parquet_records(path) if fmt == "parquet" or suffix(path) == ".parquet" else read_records(path)
        if fmt == "alpaca":
            yield from (alpaca_document(record, where) for where, record in records)
        else:
            yield from (field(record, text_key, where) for where, record in records)
    except (UnicodeDecodeError, EOFError, gzip.BadGzipFile) as exc:
        raise MixtralError(
            f"{path} cannot be read as {fmt} ({type(exc).__name__}: {str(exc)[:120]}); preprocess "
            f"reads UTF-8 text, JSON / JSON lines (optionally .gz), Parquet, and Alpaca records in "
            f"any of those: pass --format {'|'.join(FORMATS)}"
        ) from None


def read_text(path: Path) -> Iterator[str]:
    """Paragraph blocks, streamed: a blank line ends a document."""
    block: list[str] = []
    with open_text(path) as f:
        for line in itertools.chain(f, [""]):
            if line.strip():
                block.append(line)
            elif block:
                yield "".join(block).strip("\n")
                block = []


def read_records(path: Path) -> Iterator[tuple[str, dict]]:
    """(location, object) pairs from a JSON-lines file or a file holding one JSON array of objects."""
    with open_text(path) as f:
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


def read_parquet_records(path: Path) -> Iterator[tuple[str, dict]]:
    """(location, row as a dict) pairs of a Parquet file, a batch of rows at a time."""
    try:
        import pyarrow
        import pyarrow.parquet as pq
    except ImportError:
        raise MixtralError(
            f"{path}: reading Parquet needs pyarrow, which is not installed: pip install 'mixtral-run[data]'"
        ) from None
    try:
        parquet = pq.ParquetFile(path)
        row = 0
        for batch in parquet.iter_batches():
            for record in batch.to_pylist():
                yield f"{path} row {row}", record
                row += 1
    except pyarrow.ArrowException as exc:
        raise MixtralError(
            f"{path} cannot be read as Parquet ({str(exc)[:120]}); pass --format for its real "
            f"format ({'|'.join(FORMATS)})"
        ) from None


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


def tokenize_to_indexed(
    texts: Iterable[str],
    prefix: str | Path,
    tokenizer: str | None = None,
    append_eos: bool = False,
    workers: int = 1,
    progress: bool = True,
) -> tuple[int, int, str]:
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
                bar.set_postfix_str(
                    f"{writer.num_tokens / max(bar.format_dict['elapsed'], 1e-9):,.0f} tok/s", refresh=False
                )
    finally:
        bar.close()
        if pool:
            pool.terminate()
    return len(writer.lengths), writer.num_tokens, dtype.name
