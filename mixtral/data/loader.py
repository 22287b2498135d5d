"""Training samples from indexed datasets: packing, a cached shuffled sample index, splits, blending, DP sharding.

Packing: a split's documents, in a seeded shuffled order, form one token stream; sample k is the window
[k * seq_len, k * seq_len + seq_len + 1) of that stream, so consecutive windows share one token (as Megatron's
GPTDataset) and each stream token (but the first, and a tail too short for a window) is a prediction target
exactly once per epoch. Samples cross document boundaries; each document's BOS marks them.
The shuffled sample index (document order + each sample's start) is cached as .npy files under
`cache_dir/index/`, keyed by the dataset file, the split, seq_len and seed, so restarts reuse it.
Split: without valid_prefixes a fixed (seed-independent) random `valid_fraction` of each dataset's documents is
held out for validation. Blending: Megatron's BlendedDataset scheme, each sample drawn from the dataset whose
share is furthest below its weight; an epoch of the blend is as long as its parts together, and a part drawn
more often than it has samples starts over (upsampling).
"""

from __future__ import annotations

import hashlib
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from mixtral.data.indexed import IndexedDataset, exists
from mixtral.errors import MixtralError

SPLIT_SEED = 1234  # the train/validation split does not move with the training seed
CORPORA = ("builtin", "indexed")


@dataclass
class DataConfig:
    """The recipe's `data` section."""

    corpus: str = "builtin"  # "builtin" (stdlib docs) or "indexed" (use prefixes)
    prefixes: list = field(default_factory=list)  # ["path/prefix", ...] or [[weight, "path/prefix"], ...]
    valid_prefixes: list = field(default_factory=list)  # separate validation data; else split by valid_fraction
    valid_fraction: float = 0.05
    cache_dir: str = ".cache/mixtral-run"  # where the builtin corpus and sample indices are cached
    tokenizer: str | None = None

    def validate(self) -> None:
        if self.corpus not in CORPORA:
            raise MixtralError(f"data.corpus is {self.corpus!r}; choose one of {', '.join(CORPORA)}")
        if self.corpus == "indexed" and not self.prefixes:
            raise MixtralError(
                "data.prefixes is empty but data.corpus is 'indexed'; list dataset prefixes "
                "(written by `mixtral-run preprocess`) or set data.corpus=builtin"
            )
        if self.corpus == "builtin" and self.prefixes:
            raise MixtralError("data.prefixes is set but data.corpus is 'builtin'; set data.corpus=indexed to use them")
        parse_blend(self.prefixes, "data.prefixes")
        parse_blend(self.valid_prefixes, "data.valid_prefixes")
        if isinstance(self.valid_fraction, bool) or not isinstance(self.valid_fraction, (int, float)):
            raise MixtralError(f"data.valid_fraction must be a number, got {self.valid_fraction!r}")
        if not self.valid_prefixes and not 0 < self.valid_fraction < 1:
            raise MixtralError(
                f"data.valid_fraction is {self.valid_fraction}; it must be between 0 and 1 "
                "(exclusive) unless data.valid_prefixes names separate validation data"
            )
        if not isinstance(self.cache_dir, str) or not self.cache_dir:
            raise MixtralError(f"data.cache_dir must be a directory path, got {self.cache_dir!r}")
        if self.tokenizer is not None and not Path(self.tokenizer).exists():
            raise MixtralError(
                f"data.tokenizer {self.tokenizer} does not exist; give a SentencePiece .model "
                "file, or leave it unset for Mixtral's tokenizer"
            )


def parse_blend(entries: list, key: str) -> list[tuple[float, str]]:
    """`["p", ...]` or `[[weight, "p"], ...]` -> [(weight, prefix)], checking that every dataset exists."""
    if not isinstance(entries, (list, tuple)):
        raise MixtralError(f"{key} must be a list of prefixes or [weight, prefix] pairs, got {entries!r}")
    blend = []
    for entry in entries:
        if isinstance(entry, str):
            weight, prefix = 1.0, entry
        elif (
            isinstance(entry, (list, tuple))
            and len(entry) == 2
            and isinstance(entry[1], str)
            and isinstance(entry[0], (int, float))
            and not isinstance(entry[0], bool)
            and entry[0] > 0
        ):
            weight, prefix = float(entry[0]), entry[1]
        else:
            raise MixtralError(f"{key} entry {entry!r} is neither a prefix nor a [weight > 0, prefix] pair")
        if not exists(prefix):
            raise MixtralError(
                f"{key}: dataset {prefix}.idx/.bin not found; create it with "
                f"`mixtral-run preprocess --output-prefix {prefix}`"
            )
        blend.append((weight, prefix))
    return blend


class SampleSource(Protocol):
    def __len__(self) -> int: ...

    def __getitem__(self, i: int) -> torch.Tensor: ...


def _cache_stem(cache_dir: str | Path, name: str, *parts: object) -> Path:
    digest = hashlib.sha256(repr(parts).encode()).hexdigest()[:16]
    return Path(cache_dir) / "index" / f"{name}-{digest}"


def _save_atomic(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    with open(tmp, "wb") as f:
        np.save(f, array)
    os.replace(tmp, path)


def _cached(paths: list[Path], build) -> list[np.ndarray]:
    """Arrays loaded from paths, or built, saved (each atomically, the last one last) and returned."""
    if all(p.is_file() for p in paths):
        return [np.load(p, mmap_mode="r") for p in paths]
    arrays = build()
    for path, array in zip(paths, arrays):
        _save_atomic(path, array)
    return arrays


class PackedSource:
    """One split of one dataset as fixed windows of seq_len + 1 tokens over its shuffled, concatenated documents."""

    def __init__(
        self, dataset: IndexedDataset, docs: np.ndarray, seq_len: int, seed: int, cache_dir: str | Path, split: str
    ) -> None:
        self.dataset, self.window = dataset, seq_len + 1
        idx = Path(f"{dataset.prefix}.idx").resolve()
        stat = idx.stat()
        stem = _cache_stem(
            cache_dir,
            f"{dataset.prefix.name}-{split}-L{seq_len}-seed{seed}",
            str(idx),
            stat.st_size,
            stat.st_mtime_ns,
            hashlib.sha256(docs.tobytes()).hexdigest(),
            seq_len,
            seed,
        )
        order, self.samples = _cached(
            [Path(f"{stem}-doc.npy"), Path(f"{stem}-sample.npy")], lambda: self._build(docs, seq_len, seed)
        )
        self.starts, self.ends = dataset.doc_starts[order], dataset.doc_ends[order]

    def _build(self, docs: np.ndarray, seq_len: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """Megatron's three indices in two arrays: document order, and (document position, offset) per sample."""
        rng = np.random.default_rng(seed)
        order = rng.permutation(docs.astype(np.int64))
        stream_ends = np.cumsum(self.dataset.document_lengths()[order])
        total = int(stream_ends[-1]) if len(order) else 0
        first = rng.permutation(max((total - 1) // seq_len, 0)).astype(np.int64) * seq_len
        position = np.searchsorted(stream_ends, first, side="right")
        offset = first - np.concatenate([[0], stream_ends])[position]
        return order, np.stack([position, offset], axis=1)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> torch.Tensor:
        position, offset = (int(x) for x in self.samples[i])
        out = np.empty(self.window, dtype=np.int64)
        filled = 0
        while filled < self.window:
            start = self.starts[position] + offset
            piece = self.dataset.tokens[start : min(self.ends[position], start + self.window - filled)]
            out[filled : filled + len(piece)] = piece
            filled, position, offset = filled + len(piece), position + 1, 0
        return torch.from_numpy(out)


def blend_indices(weights: list[float], size: int) -> tuple[np.ndarray, np.ndarray]:
    """Megatron's greedy blending: sample i comes from the dataset whose count lags its weight the most."""
    total = sum(weights)
    weights = [w / total for w in weights]
    counts = [0] * len(weights)
    which, nth = np.empty(size, dtype=np.int64), np.empty(size, dtype=np.int64)
    for i in range(size):
        scale = max(i, 1)
        d = max(range(len(weights)), key=lambda j: weights[j] * scale - counts[j])
        which[i], nth[i] = d, counts[d]
        counts[d] += 1
    return which, nth


class BlendedSource:
    """Several sources interleaved by weight; as long as all of them together."""

    def __init__(self, sources: list[SampleSource], weights: list[float], cache_dir: str | Path, name: str) -> None:
        self.sources = sources
        size = sum(len(s) for s in sources)
        stem = _cache_stem(cache_dir, f"blend-{name}", weights, [len(s) for s in sources])
        self.which, self.nth = _cached(
            [Path(f"{stem}-dataset.npy"), Path(f"{stem}-sample.npy")], lambda: blend_indices(weights, size)
        )

    def __len__(self) -> int:
        return len(self.which)

    def __getitem__(self, i: int) -> torch.Tensor:
        source = self.sources[int(self.which[i])]
        return source[int(self.nth[i]) % len(source)]


def split_documents(num_documents: int, valid_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(train, valid) document ids: a fixed random valid_fraction of the documents (at least one) is validation."""
    n_valid = max(1, round(num_documents * valid_fraction))
    if n_valid >= num_documents:
        raise MixtralError(
            f"data.valid_fraction={valid_fraction} of {num_documents} documents leaves none for "
            "training; lower it or give data.valid_prefixes"
        )
    perm = np.random.default_rng(SPLIT_SEED).permutation(num_documents)
    return np.sort(perm[n_valid:]), np.sort(perm[:n_valid])


def _blend(parts: list[tuple[float, PackedSource]], cache_dir: str, name: str, key: str, seq_len: int) -> SampleSource:
    for _, source in parts:
        if len(source) == 0:
            raise MixtralError(
                f"{key}: {source.dataset.prefix} has fewer than seq_len + 1 = {seq_len + 1} tokens "
                f"in its {name} split; lower seq_len or add data"
            )
    if len(parts) == 1:
        return parts[0][1]
    return BlendedSource([s for _, s in parts], [w for w, _ in parts], cache_dir, name)


def build_datasets(cfg: DataConfig, seq_len: int, seed: int) -> tuple[SampleSource, SampleSource]:
    """(train, valid) sample sources for the recipe's data section; items are LongTensors of seq_len + 1 tokens."""
    cfg.validate()
    if seq_len < 1:
        raise MixtralError(f"seq_len must be at least 1, got {seq_len}")
    if cfg.corpus == "builtin":
        from mixtral.data.corpus import builtin_corpus

        train_blend = [(1.0, str(builtin_corpus(cfg.cache_dir, cfg.tokenizer)))]
    else:
        train_blend = parse_blend(cfg.prefixes, "data.prefixes")
    train, valid = [], []
    if cfg.valid_prefixes:
        for weight, prefix in train_blend:
            ds = IndexedDataset(prefix)
            train.append((weight, PackedSource(ds, np.arange(ds.num_documents), seq_len, seed, cfg.cache_dir, "train")))
        for weight, prefix in parse_blend(cfg.valid_prefixes, "data.valid_prefixes"):
            ds = IndexedDataset(prefix)
            valid.append((weight, PackedSource(ds, np.arange(ds.num_documents), seq_len, seed, cfg.cache_dir, "valid")))
    else:
        for weight, prefix in train_blend:
            ds = IndexedDataset(prefix)
            train_docs, valid_docs = split_documents(ds.num_documents, cfg.valid_fraction)
            train.append((weight, PackedSource(ds, train_docs, seq_len, seed, cfg.cache_dir, "train")))
            valid.append((weight, PackedSource(ds, valid_docs, seq_len, seed, cfg.cache_dir, "valid")))
    valid_key = "data.valid_prefixes" if cfg.valid_prefixes else "data.valid_fraction"
    return (
        _blend(train, cfg.cache_dir, "train", "data.prefixes", seq_len),
        _blend(valid, cfg.cache_dir, "valid", valid_key, seq_len),
    )


class Loader:
    """Endless micro-batches [micro_batch, seq_len + 1]; each epoch is a fresh permutation from (seed, epoch).

    Every step consumes one global batch of micro_batch * dp_size samples; rank r takes its r-th slice, so the
    ranks' batches are disjoint and together equal the one-rank batch of micro_batch * dp_size. A final partial
    global batch of an epoch is skipped.
    """

    def __init__(self, source: SampleSource, micro_batch: int, seed: int, dp_rank: int = 0, dp_size: int = 1) -> None:
        if micro_batch < 1:
            raise MixtralError(f"batch.micro_batch must be at least 1, got {micro_batch}")
        if not 0 <= dp_rank < dp_size:
            raise MixtralError(f"data-parallel rank {dp_rank} is outside 0..{dp_size - 1}")
        if len(source) < micro_batch * dp_size:
            raise MixtralError(
                f"the data has {len(source)} samples, fewer than one global batch of "
                f"{micro_batch} x {dp_size} ranks; lower batch.micro_batch or seq_len, or add data"
            )
        self.source, self.micro_batch, self.seed = source, micro_batch, seed
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.epoch, self.position = 0, 0
        self._order: tuple[int, np.ndarray] | None = None

    def _permutation(self) -> np.ndarray:
        if self._order is None or self._order[0] != self.epoch:
            self._order = (self.epoch, np.random.default_rng([self.seed, self.epoch]).permutation(len(self.source)))
        return self._order[1]

    def __iter__(self) -> Loader:
        return self

    def __next__(self) -> torch.Tensor:
        global_batch = self.micro_batch * self.dp_size
        if self.position + global_batch > len(self.source):
            self.epoch, self.position = self.epoch + 1, 0
        start = self.position + self.dp_rank * self.micro_batch
        indices = self._permutation()[start : start + self.micro_batch]
        self.position += global_batch
        return torch.stack([self.source[int(i)] for i in indices])

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "num_samples": len(self.source)}

    def load_state_dict(self, state: dict) -> None:
        if state["seed"] != self.seed or state["num_samples"] != len(self.source):
            raise MixtralError(
                f"the saved data position is for seed {state['seed']} over {state['num_samples']} "
                f"samples, but this run has seed {self.seed} over {len(self.source)}; resume with "
                "the recipe's original train.seed, seq_len and data section"
            )
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
