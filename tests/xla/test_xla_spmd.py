"""The XLA backend under torch_xla SPMD on 4 CPU virtual devices: ops, sharded loss and gradients, generation.

Runs in the XLA venv only (ci/xla.sh: torch 2.9 + torch_xla 2.9, PJRT_DEVICE=CPU CPU_NUM_DEVICES=4).
"""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("torch_xla", reason="torch_xla is not installed: the XLA tests run in ci/xla.sh's venv")

import torch_xla  # noqa: E402
import torch_xla.debug.metrics as met  # noqa: E402
import torch_xla.runtime as xr  # noqa: E402

from mixtral.backend import get_backend  # noqa: E402
from mixtral.config import MoEConfig  # noqa: E402
from mixtral.kernels import reference  # noqa: E402
from mixtral.model import Mixtral  # noqa: E402
from mixtral.parallel import spmd  # noqa: E402
from mixtral.serve.engine import Generator  # noqa: E402

from conftest import model_loss, small_config  # noqa: E402

DEVICES = 4
CAPACITY = MoEConfig(dispatcher="capacity", capacity_factor=1.25)
MESHES = {
    "fsdp2xtensor2": {"fsdp": 2, "tensor": 2},
    "expert2xtensor2": {"fsdp": 1, "expert": 2, "tensor": 2},
    "fsdp2xexpert2": {"fsdp": 2, "expert": 2, "tensor": 1},
    "fsdp4": {"fsdp": 4, "tensor": 1},
}


@pytest.fixture(scope="module")
def xla():
    backend = get_backend("xla")
    weight = torch.ones(2, device=backend.device(), requires_grad=True)  # SPMD on before the first XLA tensor
    # torch 2.9's autograd engine sizes its per-device queues at the process's first backward; a first
    # backward on the CPU (the references below) leaves none for XLA tensors moved there by .to()
    (weight * 2).sum().backward()
    backend.mark_step()
    return backend


def test_spmd_runs_on_four_cpu_devices(xla):
    assert xr.is_spmd()
    assert xr.global_runtime_device_count() == DEVICES, "set CPU_NUM_DEVICES=4 (XLA_FLAGS device counts are ignored)"


def test_ops_match_reference(xla):
    dev = xla.device()
    ops = xla.ops
    q, k, v = torch.randn(2, 6, 16, 8), torch.randn(2, 2, 16, 8), torch.randn(2, 2, 16, 8)
    mask = (torch.rand(2, 1, 16, 16) > 0.3) | torch.eye(16, dtype=torch.bool)
    for kwargs in ({"causal": True}, {"mask": mask}):
        on_xla = {key: val.to(dev) if torch.is_tensor(val) else val for key, val in kwargs.items()}
        got = ops.attention(q.to(dev), k.to(dev), v.to(dev), **on_xla).cpu()
        torch.testing.assert_close(got, reference.attention(q, k, v, **kwargs), rtol=1e-5, atol=1e-5)
    x, w = torch.randn(10, 12), torch.randn(3, 12, 7)
    offs = torch.tensor([4, 4, 10], dtype=torch.int32)  # an empty middle group
    got = ops.grouped_mm(x.to(dev), w.to(dev), offs.to(dev)).cpu()
    torch.testing.assert_close(got, reference.grouped_mm(x, w, offs), rtol=1e-5, atol=1e-5)
    gate_up, weight = torch.randn(5, 2, 16), torch.rand(16) + 0.5
    torch.testing.assert_close(ops.swiglu(gate_up.to(dev)).cpu(), reference.swiglu(gate_up), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        ops.rms_norm(gate_up.to(dev), weight.to(dev), 1e-5).cpu(),
        reference.rms_norm(gate_up, weight, 1e-5),
        rtol=1e-5,
        atol=1e-6,
    )


@pytest.mark.parametrize("mesh", MESHES.values(), ids=MESHES.keys())
def test_sharded_loss_and_gradients_equal_eager_cpu(xla, mesh):
    config = small_config(tie_word_embeddings=False)
    cpu = Mixtral(config, get_backend("cpu"), moe=CAPACITY)
    cpu.init_weights()
    model = copy.deepcopy(cpu)
    tokens = torch.randint(0, config.vocab_size, (4, 12))
    targets = torch.randint(0, config.vocab_size, (4, 12))
    expected = model_loss(cpu, tokens, targets)
    expected.loss.backward()

    model = Mixtral(config, xla, moe=CAPACITY, layout=spmd.spmd_layout(mesh))
    model.load_state_dict(cpu.state_dict())
    xla.parallelize(model, mesh)
    out = model_loss(model, tokens.to(xla.device()), targets.to(xla.device()))
    out.loss.backward()
    xla.mark_step()

    assert "devices=" in torch_xla._XLAC._get_xla_sharding_spec(model.layers[0].mlp.experts.down_proj)
    assert "devices=" in torch_xla._XLAC._get_xla_sharding_spec(model.layers[0].self_attn.q_proj.weight)
    torch.testing.assert_close(out.loss.cpu(), expected.loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.aux_loss.cpu(), expected.aux_loss, rtol=1e-5, atol=1e-5)
    assert torch.equal(out.tokens_per_expert.cpu(), expected.tokens_per_expert)
    tensor = mesh["tensor"]
    for (name, param), (_, ref) in zip(model.named_parameters(), cpu.named_parameters()):
        grad = param.grad.cpu()
        if name.endswith("gate_up_proj") and tensor > 1:  # stored interleaved for tensor sharding
            grad = spmd.deinterleave_halves(grad, tensor)
        scale = ref.grad.abs().max().item()
        torch.testing.assert_close(grad, ref.grad, rtol=1e-5, atol=1e-5 * scale, msg=lambda m: f"{name}: {m}")
    saved = model.state_dict()  # canonical layout again: loadable by the CPU model
    torch.testing.assert_close(
        saved["layers.1.mlp.experts.gate_up_proj"].cpu(),
        cpu.state_dict()["layers.1.mlp.experts.gate_up_proj"],
        rtol=0,
        atol=0,
    )


def test_greedy_generation_on_sharded_xla_equals_cpu(xla):
    config = small_config()
    cpu = Mixtral(config, get_backend("cpu"), moe=CAPACITY)
    cpu.init_weights()
    model = Mixtral(config, xla, moe=CAPACITY, layout=spmd.spmd_layout(MESHES["fsdp2xtensor2"]))
    model.load_state_dict(cpu.state_dict())
    xla.parallelize(model, MESHES["fsdp2xtensor2"])
    prompts = [[5, 17, 3, 44, 9], [8, 2]]  # different lengths: the left-padded path
    expected = Generator(cpu).generate(prompts, max_new_tokens=6, stop_at_eos=False)
    generator = Generator(model)  # no_grad on XLA; fixed shapes: the xla backend compiles per shape
    assert generator.fixed_shapes and generator.generate(prompts, max_new_tokens=6, stop_at_eos=False) == expected
    # fixed shapes: once warm (a second call sees the cache sharded by the first), more tokens at new positions
    # and other prompt lengths under 16 compile no new graph
    generator.generate(prompts, max_new_tokens=6, stop_at_eos=False)
    compiles = met.counter_value("UncachedCompile")  # XLA graph compilations (CompileTime also counts cache hits)
    longer = [[7, 1, 30], [12, 9, 4, 4, 6, 11, 2]]
    assert generator.generate(longer, max_new_tokens=12, stop_at_eos=False) == Generator(cpu).generate(
        longer, max_new_tokens=12, stop_at_eos=False
    )
    assert met.counter_value("UncachedCompile") == compiles
