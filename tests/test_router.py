"""Router options: fp32 softmax top-k, switch aux loss and z-loss, aux-loss-free expert bias, jitter, metrics."""

from __future__ import annotations

import pytest
import torch

from mixtral.backend import Ops
from mixtral.config import MoEConfig
from mixtral.errors import MixtralError
from mixtral.model import Mixtral
from mixtral.model.moe import MoE, MoEStats, moe_metrics, route, router_totals
from mixtral.train.loss import router_losses

from conftest import model_loss, small_config


def test_route_renormalises_top_k_in_fp32():
    logits = torch.tensor([[2.0, 0.0, 1.0, -1.0]], dtype=torch.bfloat16)
    r = route(logits, 2)
    p = torch.softmax(torch.tensor([2.0, 0.0, 1.0, -1.0]), 0)
    assert r.expert_ids.tolist() == [[0, 2]] and r.weights.dtype == torch.float32
    torch.testing.assert_close(r.weights, (p[[0, 2]] / (p[0] + p[2])).unsqueeze(0))


def test_router_logits_are_fp32_for_bf16_models():
    layer = MoE(small_config(), Ops.reference()).to(torch.bfloat16)
    torch.nn.init.normal_(layer.experts.gate_up_proj, std=0.2)
    x = torch.randn(2, 5, 48, dtype=torch.bfloat16)
    y, stats = layer(x)
    assert y.dtype == torch.bfloat16 and stats.logits.dtype == torch.float32
    expected = x.reshape(-1, 48).float() @ layer.gate.weight.float().t()
    torch.testing.assert_close(stats.logits, expected)


def test_aux_loss_by_hand():
    """Switch loss E * sum(fraction routed * mean prob), over all layers' tokens (transformers' formula)."""
    logits = [torch.tensor([[0.0, 0.0]]), torch.tensor([[torch.log(torch.tensor(3.0)), 0.0]])]
    # probs [.5, .5] and [.75, .25]; top-1 picks expert 0 both times: fractions [1, 0], mean probs [.625, .375].
    aux, _ = router_losses(router_totals(logits, 2, 1))
    torch.testing.assert_close(aux, torch.tensor(2 * 0.625))


def test_z_loss_by_hand():
    logits = [torch.zeros(3, 4), torch.full((3, 4), 1.0)]
    # logsumexp of 4 equal logits z is z + ln 4: layers give ln(4)^2 and (1 + ln 4)^2, averaged over all rows.
    ln4 = torch.log(torch.tensor(4.0))
    _, z_loss = router_losses(router_totals(logits, 4, 2))
    torch.testing.assert_close(z_loss, (ln4**2 + (1 + ln4) ** 2) / 2)


def test_z_loss_enters_the_model_loss():
    config = small_config()
    model = Mixtral(config, moe=MoEConfig(z_loss_coeff=0.1, aux_loss_coeff=0.5))
    model.init_weights()
    tokens = torch.randint(0, config.vocab_size, (2, 8))
    out = model_loss(model, tokens, tokens)
    torch.testing.assert_close(out.loss, out.ce_loss + 0.5 * out.aux_loss + 0.1 * out.z_loss)


def test_expert_bias_changes_selection_not_weights():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0]])
    p = torch.softmax(logits, -1)[0]
    r = route(logits, 2, bias=torch.tensor([0.0, 0.0, 0.0, 1.0]))
    assert r.expert_ids.tolist() == [[3, 0]]  # expert 3 chosen only thanks to its bias
    torch.testing.assert_close(r.weights, (p[[3, 0]] / (p[0] + p[3])).unsqueeze(0))


def test_expert_bias_update_from_observed_load():
    config = small_config(num_hidden_layers=1)
    model = Mixtral(config, moe=MoEConfig(expert_bias=True, expert_bias_update_rate=0.01))
    model.init_weights()
    layer = model.layers[0].mlp
    tokens = torch.randint(0, config.vocab_size, (2, 16))
    model.eval()(tokens)
    assert layer.expert_load.sum() == 0  # load is observed in training only
    counts = model.train()(tokens).tokens_per_expert[0] + model(tokens).tokens_per_expert[0]
    assert torch.equal(layer.expert_load, counts.float())
    model.moe_step_end()
    expected = 0.01 * torch.sign(counts.float().mean() - counts.float())
    torch.testing.assert_close(layer.expert_bias, expected)
    assert layer.expert_load.sum() == 0
    assert "layers.0.mlp.expert_bias" in model.state_dict() and "layers.0.mlp.expert_load" not in model.state_dict()
    assert "layers.0.mlp.expert_bias" not in Mixtral(config).state_dict()


def test_expert_bias_balances_a_skewed_router():
    """Aux-loss-free balancing alone pulls a router that favours one expert toward even load."""
    config = small_config(num_hidden_layers=1)
    layer = MoE(config, Ops.reference(), MoEConfig(expert_bias=True, expert_bias_update_rate=0.1)).train()
    torch.nn.init.normal_(layer.experts.gate_up_proj, std=0.2)
    with torch.no_grad():
        layer.gate.weight.normal_(0, 0.02)
        layer.gate.weight[0] += 0.3
    x = torch.rand(1, 64, 48)
    first = layer(x)[1].counts.max().item()
    for _ in range(15):
        layer(x)
        layer.update_expert_bias()
    assert layer(x)[1].counts.max().item() < first
    assert layer.expert_bias[0] < 0


def test_jitter_only_in_training():
    config = small_config(router_jitter_noise=0.0)
    layer = MoE(config, Ops.reference(), MoEConfig(jitter=0.3))
    torch.nn.init.normal_(layer.experts.gate_up_proj, std=0.2)
    torch.nn.init.normal_(layer.experts.down_proj, std=0.2)
    plain = MoE(config, Ops.reference())
    plain.load_state_dict(layer.state_dict())
    x = torch.randn(2, 7, 48)
    assert torch.equal(layer.eval()(x)[0], plain.eval()(x)[0])
    assert not torch.equal(layer.train()(x)[0], plain.train()(x)[0])
    assert MoE(small_config(router_jitter_noise=0.2), Ops.reference()).jitter == 0.2  # None: the model config's


def test_metrics_by_hand():
    counts = torch.tensor([[6, 2, 0, 0], [2, 2, 2, 2]])
    stats = [
        MoEStats(torch.zeros(4, 4), counts[0], torch.tensor(3), 4, None),
        MoEStats(torch.zeros(4, 4), counts[1], None, 2, 1),
    ]
    m = moe_metrics(stats)
    assert torch.equal(m["tokens_per_expert"], counts)
    assert m["max_load"].tolist() == [6.0, 2.0]
    assert m["imbalance"].tolist() == [3.0, 1.0]  # max / (8 pairs / 4 experts)
    assert m["dropped_fraction"].tolist() == [3 / 8, 0.0]
    assert m["capacity"].tolist() == [4, 2] and m["bin"].tolist() == [-1, 1]


@pytest.mark.parametrize("name", ["z_loss_coeff", "expert_bias_update_rate", "jitter", "aux_loss_coeff"])
def test_negative_coefficients_are_named(name):
    with pytest.raises(MixtralError, match=f"moe.{name} must be a number >= 0"):
        MoEConfig(**{name: -1.0})
