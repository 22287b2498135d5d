"""Megatron-LM's MMIDIDX indexed dataset (`P.bin` tokens + `P.idx` index), byte-compatible both ways.

`P.idx` layout (little-endian), as written by megatron/core/datasets/indexed_dataset.py:
    b"MMIDIDX\\x00\\x00"    9-byte magic
    uint64 version = 1
    uint8  dtype code        (1 uint8, 2 int8, 3 int16, 4 int32, 5 int64, 6 float64, 7 float32, 8 uint16)
    uint64 sequence count S
    uint64 document count D  (length of the document index, i.e. number of documents + 1)
    int32[S] sequence lengths (tokens)
    int64[S] sequence pointers (byte offsets into P.bin)
    int64[D] document indices (sequence index where each document starts; first 0, last S)
`P.bin` holds the sequences' tokens back to back. Our writer stores one sequence per document.
"""

from __future__ import annotations

import os
import struct
import uuid
from array import array
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from mixtral.errors import MixtralError

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
HEADER_SIZE = len(MAGIC) + 8 + 1 + 8 + 8
DTYPE_CODES = {
    np.dtype(np.uint8): 1,
    np.dtype(np.int8): 2,
    np.dtype(np.int16): 3,
    np.dtype(np.int32): 4,
    np.dtype(np.int64): 5,
    np.dtype(np.float64): 6,
    np.dtype(np.float32): 7,
    np.dtype(np.uint16): 8,
}
CODE_DTYPES = {code: dtype for dtype, code in DTYPE_CODES.items()}


def optimal_dtype(vocab_size: int) -> np.dtype:
    """Megatron's rule: uint16 tokens when the vocabulary fits below 65500, else int32."""
    return np.dtype(np.uint16 if vocab_size < 65500 else np.int32)


def idx_path(prefix: str | Path) -> Path:
    return Path(f"{prefix}.idx")


def bin_path(prefix: str | Path) -> Path:
    return Path(f"{prefix}.bin")


def exists(prefix: str | Path) -> bool:
    return idx_path(prefix).is_file() and bin_path(prefix).is_file()


class IndexedDatasetWriter:
    """Streams documents into `P.bin`; `finish()` writes `P.idx`. Both go to temporary names first and are
    renamed into place (.bin, then .idx) only when complete, so readers never see a partial dataset."""

    def __init__(self, prefix: str | Path, dtype: np.dtype | type) -> None:
        self.prefix = Path(prefix)
        self.dtype = np.dtype(dtype)
        if self.dtype not in DTYPE_CODES:
            raise MixtralError(f"token dtype {self.dtype} has no MMIDIDX code; use uint16 or int32")
        self.prefix.parent.mkdir(parents=True, exist_ok=True)
        tag = f".tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._tmp_bin = Path(f"{bin_path(prefix)}{tag}")
        self._tmp_idx = Path(f"{idx_path(prefix)}{tag}")
        self._bin = open(self._tmp_bin, "wb")
        self.lengths = array("q")
        self.num_tokens = 0
        self._limit = np.iinfo(self.dtype).max if self.dtype.kind in "iu" else None

    def add_document(self, tokens: Iterable[int] | np.ndarray) -> None:
        arr = np.asarray(tokens)
        if self._limit is not None and arr.size and (arr.min() < 0 or arr.max() > self._limit):
            raise MixtralError(
                f"token ids outside [0, {self._limit}] cannot be stored as {self.dtype}; "
                "write the dataset with dtype int32"
            )
        self._bin.write(arr.astype(self.dtype, copy=False).tobytes(order="C"))
        self.lengths.append(arr.size)
        self.num_tokens += arr.size

    def finish(self) -> None:
        self._bin.close()
        lengths = np.array(self.lengths, dtype=np.int64)
        pointers = np.zeros(len(lengths), np.int64)
        np.cumsum(lengths[:-1] * self.dtype.itemsize, out=pointers[1:])
        documents = np.arange(len(lengths) + 1, dtype=np.int64)
        with open(self._tmp_idx, "wb") as f:
            f.write(MAGIC)
            f.write(struct.pack("<Q", VERSION))
            f.write(struct.pack("<B", DTYPE_CODES[self.dtype]))
            f.write(struct.pack("<Q", len(lengths)))
            f.write(struct.pack("<Q", len(documents)))
            f.write(lengths.astype(np.int32).tobytes(order="C"))
            f.write(pointers.tobytes(order="C"))
            f.write(documents.tobytes(order="C"))
        os.replace(self._tmp_bin, bin_path(self.prefix))
        os.replace(self._tmp_idx, idx_path(self.prefix))

    def abort(self) -> None:
        """Drop the temporary files (after an error), leaving any earlier dataset at the prefix untouched."""
        self._bin.close()
        for path in (self._tmp_bin, self._tmp_idx):
            path.unlink(missing_ok=True)

    def __enter__(self) -> IndexedDatasetWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.finish()
        else:
            self.abort()


class IndexedDataset:
    """Random access to an MMIDIDX dataset through memory maps: `ds[i]` is sequence i's tokens (a numpy view),
    `ds.document(d)` document d's tokens; `doc_starts`/`doc_ends` are token offsets into the .bin."""

    def __init__(self, prefix: str | Path) -> None:
        self.prefix = Path(prefix)
        if not exists(prefix):
            raise MixtralError(
                f"indexed dataset {prefix}.idx/.bin not found; "
                "create it with `mixtral-run preprocess --output-prefix PREFIX`"
            )
        with open(idx_path(prefix), "rb") as f:
            header = f.read(HEADER_SIZE)
        bad = f"{idx_path(prefix)} is not a Megatron MMIDIDX index"
        if len(header) < HEADER_SIZE or header[:9] != MAGIC:
            raise MixtralError(f"{bad} (bad magic); rebuild it with `mixtral-run preprocess`")
        version, code, count, doc_count = struct.unpack("<QBQQ", header[9:])
        if version != VERSION or code not in CODE_DTYPES:
            raise MixtralError(
                f"{bad} (version {version}, dtype code {code}); rebuild it with `mixtral-run preprocess`"
            )
        self.dtype = CODE_DTYPES[code]
        index = np.memmap(idx_path(prefix), dtype=np.uint8, mode="r")
        if len(index) < HEADER_SIZE + count * 12 + doc_count * 8:
            raise MixtralError(f"{bad} (truncated); rebuild it with `mixtral-run preprocess`")
        offset = HEADER_SIZE
        self.sequence_lengths = np.frombuffer(index, np.int32, count, offset)
        self.sequence_pointers = np.frombuffer(index, np.int64, count, offset + 4 * count)
        self.document_indices = np.frombuffer(index, np.int64, doc_count, offset + 12 * count)
        if doc_count == 0 or self.document_indices[0] != 0 or self.document_indices[-1] != count:
            raise MixtralError(f"{bad} (document index does not span the {count} sequences)")
        has_tokens = os.path.getsize(bin_path(prefix)) > 0
        self.tokens = np.memmap(bin_path(prefix), dtype=self.dtype, mode="r") if has_tokens else np.zeros(0, self.dtype)
        seq_starts = self.sequence_pointers // self.dtype.itemsize
        seq_stops = seq_starts + self.sequence_lengths
        if count and seq_stops.max() > len(self.tokens):
            raise MixtralError(f"{bin_path(prefix)} is shorter than its index says; rebuild the dataset")
        first, last = self.document_indices[:-1], self.document_indices[1:] - 1
        nonempty = last >= first
        self.doc_starts = np.where(nonempty, np.append(seq_starts, 0)[first], 0)
        self.doc_ends = np.where(nonempty, np.append(seq_stops, 0)[last], 0)

    def __len__(self) -> int:
        return len(self.sequence_lengths)

    def __getitem__(self, i: int) -> np.ndarray:
        start = int(self.sequence_pointers[i]) // self.dtype.itemsize
        return self.tokens[start : start + int(self.sequence_lengths[i])]

    @property
    def num_documents(self) -> int:
        return len(self.document_indices) - 1

    def document(self, d: int) -> np.ndarray:
        """Document d's tokens: its sequences are contiguous in the .bin, so this is one slice."""
        return self.tokens[self.doc_starts[d] : self.doc_ends[d]]

    def document_lengths(self) -> np.ndarray:
        return self.doc_ends - self.doc_starts
