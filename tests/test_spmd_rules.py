"""The SPMD sharding rules (mixtral.parallel.spmd) as plain data: no torch_xla needed."""

from __future__ import annotations

import pytest
import torch

from mixtral.errors import MixtralError
from mixtral.kernels import reference
from mixtral.model import Mixtral
from mixtral.parallel import spmd

from conftest import small_config


def test_every_parameter_has_a_rule_matching_its_rank():
    model = Mixtral(small_config(tie_word_embeddings=False))
    for expert_axis in (False, True):
        for name, param in model.named_parameters():
            spec = spmd.param_spec(name, expert_axis)
            assert spec is None or len(spec) == param.dim(), name


def test_mlperf_tensor_parallel_rules():
    spec = spmd.param_spec
    for proj in ("q_proj", "k_proj", "v_proj"):
        assert spec(f"layers.0.self_attn.{proj}.weight") == ("tensor", "fsdp")
    assert spec("layers.3.self_attn.o_proj.weight") == ("fsdp", "tensor")
    assert spec("lm_head.weight") == ("tensor", "fsdp")
    assert spec("embed_tokens.weight") == ("fsdp", "tensor")
    # per expert, w1 / w3 [F, H] as ("tensor", "fsdp") and w2 [H, F] as ("fsdp", "tensor")
    assert spec("layers.0.mlp.experts.gate_up_proj") == (None, "tensor", "fsdp")
    assert spec("layers.0.mlp.experts.down_proj") == (None, "fsdp", "tensor")
    for name in (
        "layers.0.input_layernorm.weight",
        "layers.0.post_attention_layernorm.weight",
        "norm.weight",
        "layers.0.mlp.gate.weight",
    ):
        assert spec(name) is None


def test_expert_axis_shards_experts_on_it_and_f_on_tensor():
    assert spmd.param_spec("layers.1.mlp.experts.gate_up_proj", expert_axis=True) == ("expert", "tensor", None)
    assert spmd.param_spec("layers.1.mlp.experts.down_proj", expert_axis=True) == ("expert", None, "tensor")
    assert spmd.param_spec("layers.1.self_attn.q_proj.weight", expert_axis=True) == ("tensor", "fsdp")
    assert spmd.batch_spec(True) == (("fsdp", "expert"), None)
    assert spmd.batch_spec(False) == ("fsdp", None)


def test_unknown_parameter_is_an_error_not_silently_replicated():
    with pytest.raises(MixtralError, match="no SPMD sharding rule for parameter 'layers.0.new_proj.weight'"):
        spmd.param_spec("layers.0.new_proj.weight")


def test_mesh_axes():
    assert spmd.mesh_axes({"fsdp": 2, "tensor": 2}) == (("fsdp", "tensor"), (2, 2))
    assert spmd.mesh_axes({"tensor": 4}) == (("fsdp", "tensor"), (1, 4))
    assert spmd.mesh_axes({"expert": 2, "fsdp": 2}) == (("fsdp", "expert", "tensor"), (2, 2, 1))
    with pytest.raises(MixtralError, match="unknown mesh axes \\['data'\\]"):
        spmd.mesh_axes({"data": 4})


@pytest.mark.parametrize("parts", [1, 2, 4])
def test_interleaved_halves_shard_w1_and_w3_alike(parts):
    e, f, h = 3, 8, 5
    w = torch.randn(e, 2 * f, h)
    inter = spmd.interleave_halves(w, parts)
    chunk = f // parts
    for d, shard in enumerate(inter.chunk(parts, dim=1)):  # what tensor-shard d holds
        torch.testing.assert_close(shard[:, :chunk], w[:, d * chunk : (d + 1) * chunk], rtol=0, atol=0)
        torch.testing.assert_close(shard[:, chunk:], w[:, f + d * chunk : f + (d + 1) * chunk], rtol=0, atol=0)
    torch.testing.assert_close(spmd.deinterleave_halves(inter, parts), w, rtol=0, atol=0)
    x = torch.randn(4, 2 * f)
    torch.testing.assert_close(
        spmd.InterleavedSwiGLU(parts)(spmd.interleave_halves(x, parts, dim=1)), reference.swiglu(x), rtol=0, atol=0
    )


def test_interleave_needs_f_divisible_by_tensor():
    with pytest.raises(MixtralError, match="intermediate_size \\(5\\) must be divisible by the tensor axis \\(2\\)"):
        spmd.interleave_halves(torch.zeros(1, 10, 3), 2)


def test_interleaved_experts_compute_the_same_and_keep_canonical_state_dicts():
    config = small_config()
    plain = Mixtral(config)
    plain.init_weights()
    model = Mixtral(config, layout=spmd.spmd_layout({"fsdp": 1, "tensor": 2}))
    model.load_state_dict(plain.state_dict())
    tokens = torch.randint(0, config.vocab_size, (2, 7))
    canonical = {k: v.clone() for k, v in model.state_dict().items()}
    expected = plain(tokens).logits
    for layer in model.layers:
        spmd.use_interleaved_experts(layer.mlp.experts, 2)
    torch.testing.assert_close(model(tokens).logits, expected, rtol=1e-5, atol=1e-6)
    saved = model.state_dict()
    for key, value in canonical.items():
        torch.testing.assert_close(saved[key], value, rtol=0, atol=0)
    model.load_state_dict(canonical)  # round trip: canonical in, the same model out
    torch.testing.assert_close(model(tokens).logits, expected, rtol=1e-5, atol=1e-6)


def test_interleaving_refuses_a_model_not_built_for_it():
    model = Mixtral(small_config())
    with pytest.raises(MixtralError, match="build the model with layout=spmd_layout"):
        spmd.use_interleaved_experts(model.layers[0].mlp.experts, 2)
