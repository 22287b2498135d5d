"""Capacity bins: edges and re-shaping worked out by hand, no drops, few shapes, model state, MAX agreement."""

from __future__ import annotations

import functools
import io
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mixtral.backend import Ops
from mixtral.config import MoEConfig
from mixtral.errors import MixtralError
from mixtral.model import Mixtral
from mixtral.model.capacity_bins import CapacityBins, CapacityBinsConfig, make_bins, optimize_bins
from mixtral.model.dispatch import CapacityBinned, Routing
from mixtral.model.moe import MoE, moe_metrics
from mixtral.parallel.expert_parallel import all_reduce_max

from conftest import small_config


def test_bin_edges_by_hand():
    # 1024 tokens, top-2 of 8: range 256..1024 (768 wide). Widths 1, 2, 4 of 7: edges at
    # 256 + 768/7 = 365.7, 256 + 768*3/7 = 585.1, 1024 -> rounded up to 64: 384, 640, 1024.
    assert make_bins(1024, 8, 2, num_bins=3, exp_base=2.0, alignment=64) == [384, 640, 1024]
    # 100 tokens, top-1 of 4: range 25..100, equal widths of 75/4 = 18.75: 43.75, 62.5, 81.25, 100.
    assert make_bins(100, 4, 1, num_bins=4, exp_base=1.0, alignment=1) == [44, 63, 82, 100]
    # Gaudi's Mixtral defaults at 4096 tokens: range 1024..4096, widths 1.5**i over sum 113.33.
    edges = make_bins(4096, 8, 2, num_bins=10, exp_base=1.5, alignment=64)
    assert edges[0] == 1088 and edges[-1] == 4096 and len(set(edges)) == 10  # 1024 + 3072/113.33 = 1051.1


def test_too_few_distinct_edges_names_the_options():
    with pytest.raises(MixtralError) as err:
        make_bins(34, 5, 2, num_bins=10, exp_base=1.5, alignment=64)
    assert "give only 1 distinct edges" in str(err.value)
    assert "capacity_bins.num_bins, capacity_bins.alignment or capacity_bins.exp_base" in str(err.value)


def test_optimize_bins_by_hand():
    # From the scheme's description: range starts at 100; costs usage * width / 2 = [2500, 0, 1250, 250].
    # Cheapest (200) goes, dearest (..150] splits at 125; next pair is the last bin, which stays.
    assert optimize_bins([150, 200, 250, 300], [100, 0, 50, 10], lower=100, alignment=1) == [125, 150, 250, 300]
    # Only the last bin used: its midpoint (640 + 1024) / 2 = 832 is added, the unused first edge goes.
    assert optimize_bins([384, 640, 1024], [0, 0, 10], lower=256, alignment=64) == [640, 832, 1024]
    # A bin too narrow to split at an aligned point is left whole; equal costs change nothing.
    assert optimize_bins([64, 128], [5, 0], lower=60, alignment=64) == [64, 128]
    assert optimize_bins([10, 20, 30], [1, 1, 1], lower=0, alignment=1) == [10, 20, 30]


def bins_moe(**bins) -> tuple[MoE, MoE]:
    config = small_config()
    ops = Ops.reference()
    ref = MoE(config, ops)
    torch.nn.init.normal_(ref.experts.gate_up_proj, std=0.2)
    torch.nn.init.normal_(ref.experts.down_proj, std=0.2)
    binned = MoE(
        config, ops, MoEConfig(dispatcher="capacity_bins", capacity_bins=dict(alignment=2, num_bins=4, **bins))
    )
    binned.load_state_dict(ref.state_dict(), strict=False)
    return ref, binned


def test_output_equals_dropless():
    """No token is dropped: equal to dropless up to the padded GEMMs' fp32 rounding, gradients too."""
    ref, binned = bins_moe()
    for train in (True, False):
        x = torch.randn(2, 15, 48, requires_grad=True)
        x2 = x.detach().clone().requires_grad_()
        y_ref, _ = ref.train(train)(x)
        y, stats = binned.train(train)(x2)
        torch.testing.assert_close(y, y_ref, rtol=1e-6, atol=1e-6)
        assert stats.dropped is None and stats.capacity >= int(stats.counts.max()) and stats.bin >= 0
        y_ref.sum().backward()
        y.sum().backward()
        torch.testing.assert_close(x2.grad, x.grad, rtol=1e-5, atol=1e-6)
    assert binned.dispatcher.bins.usage.sum() == 1  # counted in training only


def test_few_shapes_over_random_batches():
    num_bins, experts, tokens = 6, 8, 256
    dispatcher = CapacityBinned(experts, 2, CapacityBinsConfig(num_bins=num_bins, alignment=8)).train()
    shapes, x = set(), torch.randn(tokens, 16)
    for _ in range(200):
        skew = torch.rand(experts) * torch.rand(()) * 6  # from even to heavily skewed routing
        ids = torch.multinomial(torch.softmax(skew, 0).expand(tokens, -1), 2)
        weights = torch.rand(tokens, 2)
        weights = weights / weights.sum(-1, keepdim=True)
        rows, counts, ctx = dispatcher.dispatch(x, Routing(torch.zeros(tokens, experts), weights, ids))
        shapes.add(tuple(rows.shape))
        torch.testing.assert_close(dispatcher.combine(rows, ctx), x)  # identity experts: nothing dropped
    assert 1 < len(shapes) <= num_bins
    assert dispatcher.bins.usage.sum() == 200


def test_bins_are_model_state_and_reshape_every_interval():
    config = small_config(num_hidden_layers=3)
    moe = MoEConfig(
        dispatcher="capacity_bins", capacity_bins=dict(num_bins=4, alignment=2, optimize_interval=2, group_size=2)
    )
    model = Mixtral(config, moe=moe).train()
    model.init_weights()
    tokens = torch.randint(0, config.vocab_size, (2, 24))
    bins = [layer.mlp.dispatcher.bins for layer in model.layers]
    model(tokens)
    first = bins[0].edges.tolist()
    assert first == make_bins(48, 5, 2, 4, 1.5, 2) and first[-1] == 48
    model.moe_step_end()
    model(tokens)
    model.moe_step_end()  # step 2: re-shaped from usage, counts start again
    after = [b.edges.tolist() for b in bins]
    assert after[0] == after[1] and after[0] != first  # layers 0 and 1 share bins, layer 2 has its own
    assert all(len(set(e)) == 4 and e[-1] == 48 for e in after)
    assert all(b.usage.sum() == 0 and int(b.steps) == 2 for b in bins)

    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    restored = Mixtral(config, moe=moe)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    assert [layer.mlp.dispatcher.bins.edges.tolist() for layer in restored.layers] == after
    assert int(restored.layers[0].mlp.dispatcher.bins.steps) == 2
    used = moe_metrics(restored.train()(tokens).routing)["capacity"].tolist()
    assert all(c in edges for c, edges in zip(used, after))  # picked from the restored bins, not fresh ones
    assert [layer.mlp.dispatcher.bins.edges.tolist() for layer in restored.layers] == after


def test_usage_reshape_moves_edges_toward_used_bins():
    bins = CapacityBins(CapacityBinsConfig(num_bins=3, exp_base=2.0, alignment=64, tokens=1024), 8, 2).train()
    bins.capacity(torch.tensor([300, 250, 256, 256, 256, 256, 250, 280]), 1024)  # initialises, bin 0
    assert bins.host_edges() == [384, 640, 1024]
    for _ in range(5):
        assert bins.capacity(torch.tensor([900, 100, 100, 100, 100, 100, 300, 348]), 1024) == (1024, 2)
    new = optimize_bins(bins.host_edges(), bins.usage.tolist(), bins.lower(), bins.alignment)
    assert new == [384, 832, 1024]  # the unused middle bin moved up into the used range


def _agree(rank: int, path: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=2)
    bins = CapacityBins(CapacityBinsConfig(num_bins=3, exp_base=2.0, alignment=64, tokens=1024), 8, 2).train()
    bins.agree = functools.partial(all_reduce_max, group=dist.group.WORLD)
    counts = torch.tensor([700 if rank else 260] + [256] * 7)
    assert bins.capacity(counts, 1024) == (1024, 2)  # rank 0's own max (260) is bin 0; MAX makes it 2
    dist.destroy_process_group()


def test_ranks_agree_on_the_bin_by_all_reduce_max():
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_agree, args=(os.path.join(tmp, "rendezvous"),), nprocs=2)
