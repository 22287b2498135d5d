"""Dispatchers: capacity drops worked out by hand, equality with dropless, gradients, config errors."""

from __future__ import annotations

import pytest
import torch

from mixtral.backend import Ops, get_backend
from mixtral.config import MoEConfig
from mixtral.errors import MixtralError
from mixtral.model import Mixtral
from mixtral.model.dispatch import Capacity, Dropless, Routing
from mixtral.model.moe import MoE, moe_metrics

from conftest import model_loss, small_config

# 4 tokens, top-2 of 3 experts; worked through by hand in test_capacity_drops_by_hand.
IDS = torch.tensor([[0, 1], [0, 2], [1, 0], [0, 1]])
WEIGHTS = torch.tensor([[0.6, 0.4], [0.7, 0.3], [0.9, 0.1], [0.5, 0.5]])


def identity_experts(rows: torch.Tensor, counts: torch.Tensor | None) -> torch.Tensor:
    return rows


@pytest.mark.parametrize("pad", [True, False])
@pytest.mark.parametrize(
    "policy,per,factor,scale,dropped",
    [
        # batch, C = ceil(0.75 * 4 * 2 / 3) = 2. position: first choices t0,t1,t3 -> e0 (t3 dropped),
        # t2 -> e1; then second choices t0 -> e1, t1 -> e2 kept, t2 -> e0 and t3 -> e1 dropped.
        ("position", "batch", 0.75, [1.0, 1.0, 0.9, 0.0], 3),
        # probs: by weight .9 t2e1, .7 t1e0, .6 t0e0, .5 t3e0 (e0 full), .5 t3e1, .4 t0e1 (e1 full), .3 t1e2, .1 t2e0.
        ("probs", "batch", 0.75, [0.6, 1.0, 0.9, 0.5], 3),
        # sequence, C = floor(0.75 * 2 * 2 / 3) = 1 per sequence. seq (t0, t1): t0e0, t0e1, t1e2 kept, t1e0 dropped;
        # seq (t2, t3): t2e1, t3e0 kept, t2e0 and t3e1 dropped.
        ("position", "sequence", 0.75, [1.0, 0.3, 0.9, 0.5], 3),
    ],
)
def test_capacity_drops_by_hand(pad, policy, per, factor, scale, dropped):
    x = torch.randn(4, 6)
    cap = Capacity(3, 2, Ops.reference(), factor, per, policy, pad)
    rows, counts, ctx = cap.dispatch(x, Routing(torch.zeros(4, 3), WEIGHTS, IDS), batch=2)
    assert (counts is None) == pad
    y = cap.combine(identity_experts(rows, counts), ctx)
    torch.testing.assert_close(y, x * torch.tensor(scale).unsqueeze(-1))
    assert int(ctx.dropped) == dropped
    assert ctx.counts.tolist() == [4, 3, 1]


def test_capacity_rounding():
    cap = Capacity(8, 2, Ops.reference(), 1.25)
    assert cap.capacity(100) == 32  # ceil(1.25 * 100 * 2 / 8) = ceil(31.25)
    assert cap.capacity(4) == 2  # ceil(1.25)
    seq = Capacity(8, 2, Ops.reference(), 1.25, per="sequence")
    assert seq.capacity(100) == 31  # MLPerf: int(100 * 2 / 8 * 1.25)
    assert seq.capacity(2) == 1  # int(0.625) = 0, clamped to 1
    assert Capacity(5, 2, Ops.reference(), 2.5, per="sequence").capacity(17) == 17  # E / k never drops
    assert Capacity(8, 2, Ops.reference(), 100.0).capacity(10) == 10  # at most one pair per token


def moe_pair(moe: MoEConfig, ops: Ops):
    config = small_config()
    ref = MoE(config, ops)
    torch.nn.init.normal_(ref.experts.gate_up_proj, std=0.2)
    torch.nn.init.normal_(ref.experts.down_proj, std=0.2)
    other = MoE(config, ops, moe)
    other.load_state_dict(ref.state_dict(), strict=False)
    return ref, other


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize(
    "moe",
    [
        MoEConfig(dispatcher="capacity", capacity_factor=2.5),
        MoEConfig(dispatcher="capacity", capacity_factor=2.5, capacity_per="sequence", drop_policy="probs"),
        MoEConfig(dispatcher="capacity", capacity_factor=4.0, pad_to_capacity=False),
        MoEConfig(dispatcher="capacity", capacity_factor=2.5, capacity_per="sequence", pad_to_capacity=False),
    ],
    ids=["padded", "padded-seq-probs", "packed", "packed-seq"],
)
def test_capacity_at_experts_over_top_k_equals_dropless(backend, moe):
    """factor >= E / k (5 / 2) never drops. Packed rows are the dropless rows: bitwise equal.
    Padded rows run [E, C, H] batched GEMMs whose fp32 rounding depends on C: equal to a few ulps."""
    ops = Ops.reference() if backend == "reference" else get_backend("cpu").ops
    ref, cap = moe_pair(moe, ops)
    x = torch.randn(3, 11, 48, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    y_ref, s_ref = ref(x)
    y, stats = cap(x2)
    assert int(stats.dropped) == 0
    if moe.pad_to_capacity:
        torch.testing.assert_close(y, y_ref, rtol=1e-6, atol=1e-6)
    else:
        assert torch.equal(y, y_ref)
    assert torch.equal(stats.counts, s_ref.counts)
    grad = torch.randn_like(y)
    y_ref.backward(grad)
    y.backward(grad)
    torch.testing.assert_close(x2.grad, x.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cap.experts.gate_up_proj.grad, ref.experts.gate_up_proj.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("pad", [True, False])
def test_dropped_tokens_keep_only_the_residual(pad):
    """All tokens on expert 0 (the zero-token experts case too): past capacity a token gets no expert
    output and no gradient through the experts; padded and packed agree."""
    config = small_config(num_hidden_layers=1)
    moe = MoEConfig(dispatcher="capacity", capacity_factor=1.0, pad_to_capacity=pad)
    layer = MoE(config, Ops.reference(), moe)
    torch.nn.init.normal_(layer.experts.gate_up_proj, std=0.2)
    torch.nn.init.normal_(layer.experts.down_proj, std=0.2)
    with torch.no_grad():
        layer.gate.weight.zero_()
        layer.gate.weight[0] = 1.0
        layer.gate.weight[1] = 0.5
    x = torch.rand(1, 10, 48).add(0.1).requires_grad_()  # positive: every token picks experts 0 and 1
    y, stats = layer(x)
    cap = layer.dispatcher.capacity(10)  # ceil(1.0 * 10 * 2 / 5) = 4
    assert cap == 4 and stats.counts.tolist() == [10, 10, 0, 0, 0]
    assert int(stats.dropped) == 12
    assert y[0, cap:].abs().max() == 0 and y[0, :cap].abs().min() > 0
    y.sum().backward()
    assert x.grad[0, cap:].abs().max() == 0


def test_dropped_fraction_in_model_metrics():
    config = small_config()
    model = Mixtral(config, moe=MoEConfig(dispatcher="capacity", capacity_factor=0.5)).train()
    model.init_weights()
    tokens = torch.randint(0, config.vocab_size, (2, 20))
    out = model_loss(model, tokens, tokens)
    m = moe_metrics(out.routing)
    assert m["dropped_fraction"].shape == (config.num_hidden_layers,)
    kept = out.tokens_per_expert.clamp(max=8).sum(1)  # C = ceil(0.5 * 40 * 2 / 5) = 8 per expert
    torch.testing.assert_close(m["dropped_fraction"], 1 - kept.float() / 80)
    assert m["capacity"].tolist() == [8, 8] and m["bin"].tolist() == [-1, -1]
    out.loss.backward()


def test_dropless_reports_no_drops():
    out = Mixtral(small_config()).train()(torch.randint(0, 101, (2, 9)))
    assert moe_metrics(out.routing)["dropped_fraction"].tolist() == [0.0, 0.0]
    assert moe_metrics(out.routing)["capacity"].tolist() == [0, 0]


def test_dropless_dispatch_is_the_permute_op():
    ops = Ops.reference()
    routing = Routing(torch.zeros(4, 3), WEIGHTS, IDS)
    x = torch.randn(4, 6)
    rows, counts, ctx = Dropless(3, ops).dispatch(x, routing)
    assert counts.tolist() == [4, 3, 1]
    torch.testing.assert_close(Dropless(3, ops).combine(rows, ctx), x)  # weights sum to 1


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(dispatcher="capacity"), "moe.capacity_factor must be a positive number"),
        (dict(dispatcher="capacity_bins", capacity_factor=1.25), "remove capacity_factor (capacity bins never drop"),
        (dict(dispatcher="dropless", capacity_factor=1.25), "use dispatcher: capacity"),
        (dict(dispatcher="dropless", capacity_bins={"num_bins": 4}), "set dispatcher: capacity_bins"),
        (dict(dispatcher="capacity_bins", capacity_bins={"bins": 4}), "unknown option(s) bins"),
        (dict(dispatcher="capacity_bins", capacity_bins={"exp_base": 0.5}), "exp_base must be a number >= 1.0"),
        (dict(dispatcher="capacity", capacity_factor=1.0, drop_policy="random"), "moe.drop_policy 'random' is unknown"),
        (dict(dispatcher="capacity", capacity_factor=1.0, capacity_per="token"), "moe.capacity_per 'token' is unknown"),
        (dict(dispatcher="sparse"), "moe.dispatcher 'sparse' is unknown"),
    ],
)
def test_moe_config_errors_name_key_and_fix(kwargs, message):
    with pytest.raises(MixtralError) as err:
        MoEConfig(**kwargs)
    assert message in str(err.value)
