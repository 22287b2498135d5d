"""The loader: packing, the cached index, splits, blending, data-parallel shards, exact resume, builtin corpus."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mixtral.data import corpus, loader
from mixtral.data.indexed import IndexedDataset, IndexedDatasetWriter
from mixtral.data.loader import DataConfig, Loader, PackedSource, build_datasets
from mixtral.errors import MixtralError


def make_dataset(prefix, num_docs: int, base: int, seed: int = 0) -> list[np.ndarray]:
    """Documents of 1..40 tokens whose ids are unique over the dataset: base, base + 1, ... in document order."""
    lengths = np.random.default_rng(seed).integers(1, 41, num_docs)
    bounds = base + np.concatenate([[0], np.cumsum(lengths)])
    docs = [np.arange(bounds[d], bounds[d + 1]) for d in range(num_docs)]
    with IndexedDatasetWriter(prefix, np.uint16) as writer:
        for doc in docs:
            writer.add_document(doc)
    return docs


def doc_of(docs: list[np.ndarray]) -> dict[int, int]:
    return {int(t): d for d, doc in enumerate(docs) for t in doc}


@pytest.fixture
def data(tmp_path):
    docs = make_dataset(tmp_path / "a", 80, base=100)
    cfg = DataConfig(
        corpus="indexed", prefixes=[str(tmp_path / "a")], valid_fraction=0.25, cache_dir=str(tmp_path / "cache")
    )
    return cfg, docs


def stream_of(source) -> list[int]:
    """Chains the samples by their one-token overlap back into the packed token stream."""
    samples = [source[i].tolist() for i in range(len(source))]
    by_first = {s[0]: s for s in samples}
    heads = [s for s in samples if s[0] not in {t[-1] for t in samples}]
    assert len(heads) == 1
    stream = list(heads[0])
    while stream[-1] in by_first:
        stream += by_first[stream[-1]][1:]
    return stream


def test_packing_concatenates_whole_documents(data, tmp_path):
    cfg, docs = data
    make_dataset(tmp_path / "v", 5, base=5000)
    cfg.valid_prefixes = [str(tmp_path / "v")]  # so that training packs all 80 documents
    train, _ = build_datasets(cfg, seq_len=16, seed=3)
    total = sum(map(len, docs))
    assert len(train) == (total - 1) // 16
    assert all(train[i].dtype == torch.int64 and train[i].shape == (17,) for i in range(len(train)))
    stream = stream_of(train)
    assert len(stream) == 16 * len(train) + 1 and total - len(stream) < 16
    owner = doc_of(docs)
    runs = [owner[t] for i, t in enumerate(stream) if i == 0 or owner[t] != owner[stream[i - 1]]]
    assert len(runs) == len(set(runs))
    assert runs != sorted(runs)  # documents are shuffled
    assert stream == np.concatenate([docs[d] for d in runs]).tolist()[: len(stream)]


def test_split_is_disjoint_and_seed_independent(data):
    cfg, docs = data
    owner = doc_of(docs)
    train, valid = build_datasets(cfg, seq_len=8, seed=0)
    train_docs = {owner[t] for i in range(len(train)) for t in train[i].tolist()}
    valid_docs = {owner[t] for i in range(len(valid)) for t in valid[i].tolist()}
    assert not train_docs & valid_docs and len(valid_docs) <= 20 and len(train_docs) >= 55
    _, valid_other_seed = build_datasets(cfg, seq_len=8, seed=1)
    assert valid_docs == {owner[t] for i in range(len(valid_other_seed)) for t in valid_other_seed[i].tolist()}


def test_separate_validation_prefixes(data, tmp_path):
    cfg, docs = data
    vdocs = make_dataset(tmp_path / "v", 10, base=5000, seed=1)
    cfg.valid_prefixes = [str(tmp_path / "v")]
    train, valid = build_datasets(cfg, seq_len=8, seed=0)
    assert len(train) == (sum(map(len, docs)) - 1) // 8
    assert {t for i in range(len(valid)) for t in valid[i].tolist()} <= set(np.concatenate(vdocs).tolist())


def test_index_is_deterministic_and_cached(data, monkeypatch):
    cfg, _ = data
    first, _ = build_datasets(cfg, seq_len=16, seed=7)
    assert len(list((Path(cfg.cache_dir) / "index").glob("*.npy"))) == 4
    monkeypatch.setattr(PackedSource, "_build", lambda *a: pytest.fail("sample index rebuilt"))
    again, _ = build_datasets(cfg, seq_len=16, seed=7)
    assert all(torch.equal(first[i], again[i]) for i in range(len(first)))
    monkeypatch.undo()
    other, _ = build_datasets(cfg, seq_len=16, seed=8)
    assert [other[i][0] for i in range(5)] != [first[i][0] for i in range(5)]


def batches(source, n: int, **kwargs) -> list[torch.Tensor]:
    it = Loader(source, **kwargs)
    return [next(it) for _ in range(n)]


def test_loader_epochs_reshuffle_and_cover(data):
    cfg, _ = data
    train, _ = build_datasets(cfg, seq_len=16, seed=0)
    per_epoch = len(train) // 4
    run = batches(train, 2 * per_epoch, micro_batch=4, seed=5)
    assert all(b.shape == (4, 17) for b in run)
    assert all(torch.equal(a, b) for a, b in zip(run, batches(train, 2 * per_epoch, micro_batch=4, seed=5)))
    epoch0, epoch1 = torch.cat(run[:per_epoch]), torch.cat(run[per_epoch:])
    assert len({tuple(r) for r in epoch0.tolist()}) == len(epoch0)  # no sample twice in an epoch
    assert not torch.equal(epoch0, epoch1)
    firsts0, firsts1 = set(epoch0[:, 0].tolist()), set(epoch1[:, 0].tolist())
    assert len(firsts0 & firsts1) >= len(epoch0) - len(train) % 4  # only the dropped remainders differ


def test_data_parallel_shards_partition_the_global_batch(data):
    cfg, _ = data
    train, _ = build_datasets(cfg, seq_len=16, seed=0)
    steps = len(train) // 6 + 3  # crosses an epoch boundary
    whole = batches(train, steps, micro_batch=6, seed=1)
    shards = [batches(train, steps, micro_batch=2, seed=1, dp_rank=r, dp_size=3) for r in range(3)]
    for step in range(steps):
        parts = [shards[r][step] for r in range(3)]
        assert torch.equal(torch.cat(parts), whole[step])
        assert len({tuple(row) for p in parts for row in p.tolist()}) == 6


def test_resume_mid_epoch_gives_identical_batches(data):
    cfg, _ = data
    train, _ = build_datasets(cfg, seq_len=16, seed=0)
    steps = len(train) // 3 + 4
    reference = batches(train, 2 * steps, micro_batch=3, seed=2)
    first = Loader(train, micro_batch=3, seed=2)
    for _ in range(steps):
        next(first)
    state = first.state_dict()
    resumed = Loader(train, micro_batch=3, seed=2)
    resumed.load_state_dict(state)
    assert all(torch.equal(next(resumed), reference[steps + i]) for i in range(steps))
    with pytest.raises(MixtralError, match="train.seed"):
        Loader(train, micro_batch=3, seed=9).load_state_dict(state)


def test_blend_follows_weights(tmp_path):
    a = doc_of(make_dataset(tmp_path / "a", 60, base=100))
    make_dataset(tmp_path / "b", 200, base=10000, seed=1)
    cfg = DataConfig(
        corpus="indexed",
        prefixes=[[0.7, str(tmp_path / "a")], [0.3, str(tmp_path / "b")]],
        cache_dir=str(tmp_path / "cache"),
    )
    train, valid = build_datasets(cfg, seq_len=8, seed=0)
    from_a = np.array([int(train[i][0]) in a for i in range(len(train))])
    assert len(train) > 500
    for n in (10, 100, len(train)):
        assert abs(from_a[:n].mean() - 0.7) <= 1 / n
    assert 0.6 < np.mean([int(valid[i][0]) in a for i in range(len(valid))]) < 0.8


def test_blend_indices_greedy_scheme():
    which, nth = loader.blend_indices([3, 1], 8)
    assert which.tolist() == [0, 1, 0, 0, 0, 1, 0, 0] and nth.tolist() == [0, 0, 1, 2, 3, 1, 4, 5]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(corpus="web"), "data.corpus is 'web'"),
        (dict(corpus="indexed"), "data.prefixes is empty"),
        (dict(prefixes=["x"]), "data.prefixes is set but data.corpus is 'builtin'"),
        (dict(corpus="indexed", prefixes=[[0, "x"]]), r"data.prefixes entry \[0, 'x'\]"),
        (dict(corpus="indexed", prefixes=["nowhere/x"]), "data.prefixes: dataset nowhere/x.idx/.bin not found"),
        (dict(valid_fraction=0.0), "data.valid_fraction is 0.0"),
        (dict(valid_fraction="0.1"), "data.valid_fraction must be a number"),
        (dict(tokenizer="no/such.model"), "data.tokenizer no/such.model does not exist"),
    ],
)
def test_invalid_config_names_the_key(tmp_path, overrides, message):
    with pytest.raises(MixtralError, match=message):
        build_datasets(DataConfig(cache_dir=str(tmp_path), **overrides), seq_len=8, seed=0)


def test_too_little_data_is_a_clear_error(data):
    cfg, _ = data
    with pytest.raises(MixtralError, match="fewer than seq_len"):
        build_datasets(cfg, seq_len=2000, seed=0)
    train, _ = build_datasets(cfg, seq_len=16, seed=0)
    with pytest.raises(MixtralError, match="batch.micro_batch"):
        Loader(train, micro_batch=len(train) + 1, seed=0)


def test_builtin_corpus_builds_once_and_trains(tmp_path, monkeypatch):
    code = "import sys; from mixtral.data.corpus import builtin_corpus; print(builtin_corpus(sys.argv[1]))"
    procs = [
        subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]  # two processes building the same cache at once
    prefixes = [p.communicate()[0].strip() for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert len(prefixes) == 2 and prefixes[0] == prefixes[1]
    monkeypatch.setattr(corpus, "tokenize_to_indexed", lambda *a, **k: pytest.fail("corpus rebuilt"))
    prefix = corpus.builtin_corpus(tmp_path)
    assert str(prefix) == prefixes[0]
    assert sorted(p.name for p in prefix.parent.iterdir()) == [prefix.name + ".bin", prefix.name + ".idx"]
    ds = IndexedDataset(prefix)
    docs = corpus.documents()
    assert ds.num_documents == len(docs) > 100
    from mixtral.data.tokenizer import load_tokenizer

    tok = load_tokenizer(None)
    assert ds.document(0).tolist() == tok.encode(docs[0], bos=True, eos=True)
    train, valid = build_datasets(DataConfig(cache_dir=str(tmp_path)), seq_len=64, seed=0)
    assert len(train) > 1500 and len(valid) > 50
    text = tok.decode(next(Loader(train, micro_batch=2, seed=0))[0].tolist())
    assert text.strip()[:30] in "\n".join(docs)
