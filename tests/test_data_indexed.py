"""MMIDIDX files: the bytes against an independent reader written from Megatron-LM's format, and round trips."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest

from mixtral.data.indexed import IndexedDataset, IndexedDatasetWriter, optimal_dtype
from mixtral.errors import MixtralError

SPEC_DTYPES = {
    1: np.uint8,
    2: np.int8,
    3: np.int16,
    4: np.int32,
    5: np.int64,
    6: np.float64,
    7: np.float32,
    8: np.uint16,
}


def spec_read(prefix) -> dict:
    """A minimal MMIDIDX reader following megatron/core/datasets/indexed_dataset.py's _IndexWriter layout."""
    raw = Path(f"{prefix}.idx").read_bytes()
    magic, version, code, count, doc_count = struct.unpack_from("<9sQBQQ", raw, 0)
    at = 34
    lengths = struct.unpack_from(f"<{count}i", raw, at)
    pointers = struct.unpack_from(f"<{count}q", raw, at + 4 * count)
    documents = struct.unpack_from(f"<{doc_count}q", raw, at + 12 * count)
    dtype = np.dtype(SPEC_DTYPES[code]).newbyteorder("<")
    data = Path(f"{prefix}.bin").read_bytes()
    sequences = [np.frombuffer(data, dtype, n, p).tolist() for n, p in zip(lengths, pointers)]
    return dict(
        magic=magic,
        version=version,
        code=code,
        count=count,
        doc_count=doc_count,
        lengths=lengths,
        pointers=pointers,
        documents=documents,
        sequences=sequences,
        idx_size=len(raw),
        bin_size=len(data),
    )


def spec_write(prefix, documents: list[list[list[int]]]) -> None:
    """Megatron-style files where a document is several sequences (as sentence-split preprocessing writes)."""
    sequences = [s for doc in documents for s in doc]
    lengths = [len(s) for s in sequences]
    pointers = np.concatenate([[0], np.cumsum(lengths)[:-1] * 2]).astype(np.int64)
    doc_index = np.concatenate([[0], np.cumsum([len(d) for d in documents])]).astype(np.int64)
    with open(f"{prefix}.bin", "wb") as f:
        f.write(np.array([t for s in sequences for t in s], np.uint16).tobytes())
    with open(f"{prefix}.idx", "wb") as f:
        f.write(b"MMIDIDX\x00\x00" + struct.pack("<QBQQ", 1, 8, len(sequences), len(doc_index)))
        f.write(np.array(lengths, np.int32).tobytes() + pointers.tobytes() + doc_index.tobytes())


def random_documents(n: int, high: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, high, rng.integers(0, 40)) for _ in range(n)]


def write(prefix, docs, dtype) -> None:
    with IndexedDatasetWriter(prefix, dtype) as writer:
        for doc in docs:
            writer.add_document(doc)


@pytest.mark.parametrize("dtype, code, high", [(np.uint16, 8, 32000), (np.int32, 4, 100_000)])
def test_idx_bytes_follow_megatron_layout(tmp_path, dtype, code, high):
    docs = random_documents(25, high)
    write(tmp_path / "d", docs, dtype)
    spec = spec_read(tmp_path / "d")
    itemsize = np.dtype(dtype).itemsize
    assert spec["magic"] == b"MMIDIDX\x00\x00" and spec["version"] == 1 and spec["code"] == code
    assert spec["count"] == 25 and spec["doc_count"] == 26
    assert list(spec["lengths"]) == [len(d) for d in docs]
    assert list(spec["pointers"]) == [itemsize * sum(len(d) for d in docs[:i]) for i in range(25)]
    assert list(spec["documents"]) == list(range(26))
    assert spec["sequences"] == [d.tolist() for d in docs]
    assert spec["idx_size"] == 34 + 12 * 25 + 8 * 26
    assert spec["bin_size"] == itemsize * sum(len(d) for d in docs)


def test_round_trip_and_no_temporary_files(tmp_path):
    docs = random_documents(30, 32000, seed=1)
    write(tmp_path / "sub" / "d", docs, optimal_dtype(32000))
    ds = IndexedDataset(tmp_path / "sub" / "d")
    assert ds.dtype == np.uint16 and len(ds) == 30 and ds.num_documents == 30
    for i, doc in enumerate(docs):
        np.testing.assert_array_equal(ds[i], doc)
        np.testing.assert_array_equal(ds.document(i), doc)
    np.testing.assert_array_equal(ds.document_lengths(), [len(d) for d in docs])
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["d.bin", "d.idx"]


def test_reads_multi_sequence_documents(tmp_path):
    documents = [[[5, 6], [7]], [], [[8, 9, 10]], [[11], [], [12, 13]]]
    spec_write(tmp_path / "m", documents)
    ds = IndexedDataset(tmp_path / "m")
    assert len(ds) == 6 and ds.num_documents == 4
    assert [ds[i].tolist() for i in range(6)] == [[5, 6], [7], [8, 9, 10], [11], [], [12, 13]]
    assert [ds.document(d).tolist() for d in range(4)] == [[5, 6, 7], [], [8, 9, 10], [11, 12, 13]]


def test_optimal_dtype_matches_megatron():
    assert optimal_dtype(32000) == np.uint16 and optimal_dtype(65499) == np.uint16
    assert optimal_dtype(65500) == np.int32 and optimal_dtype(131072) == np.int32


def test_failed_write_keeps_previous_dataset(tmp_path):
    write(tmp_path / "d", [np.array([1, 2, 3])], np.uint16)
    with pytest.raises(MixtralError, match="int32"):
        write(tmp_path / "d", [np.array([4]), np.array([70000])], np.uint16)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.bin", "d.idx"]
    assert IndexedDataset(tmp_path / "d")[0].tolist() == [1, 2, 3]


def test_bad_files_raise_clear_errors(tmp_path):
    with pytest.raises(MixtralError, match="not found.*preprocess"):
        IndexedDataset(tmp_path / "missing")
    write(tmp_path / "d", random_documents(4, 100), np.uint16)
    raw = (tmp_path / "d.idx").read_bytes()
    (tmp_path / "d.idx").write_bytes(b"NOTMMIDX\x00" + raw[9:])
    with pytest.raises(MixtralError, match="bad magic"):
        IndexedDataset(tmp_path / "d")
    (tmp_path / "d.idx").write_bytes(raw[:-8])
    with pytest.raises(MixtralError, match="truncated"):
        IndexedDataset(tmp_path / "d")
