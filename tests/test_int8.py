"""Weight-only int8 (`generate / serve --dtype int8`, `convert --dtype int8`): the quantization, the CPU's ops
against kernels/reference, the int8 model against a float model holding the same dequantized weights, and the
stored int8 checkpoint read back."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from mixtral.backend import Ops, get_backend
from mixtral.build import build_on_meta, materialize
from mixtral.checkpoint.hf import save_hf
from mixtral.checkpoint.loading import ModuleSource, checkpoint_config
from mixtral.cli import main
from mixtral.errors import MixtralError
from mixtral.kernels import int8_weights, reference
from mixtral.model import Mixtral
from mixtral.model.layout import ModelLayout
from mixtral.model.linear import int8_scale_name, int8_weight
from mixtral.serve.engine import Generator

from conftest import small_config

INT8 = ModelLayout(int8=True)


def test_quantization_is_the_nearest_int8_per_output_channel():
    w = torch.randn(3, 7, 40) * torch.rand(3, 7, 1) * 4
    w[1, 2] = 0  # an all-zero channel
    q, scale = reference.quantize_int8(w, torch.bfloat16)
    assert q.dtype == torch.int8 and scale.dtype == torch.bfloat16 and scale.shape == (3, 7)
    assert q.abs().max() <= 127 and (q[1, 2] == 0).all()
    error = (q.float() * scale.float().unsqueeze(-1) - w).abs()
    assert (error <= scale.float().unsqueeze(-1) / 2 + 1e-6).all()  # rounded to the nearest step of its channel
    assert (q.abs().amax(-1)[w.abs().amax(-1) > 0] >= 126).all()  # each channel uses the whole int8 range


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("rows", [1, 5])
def test_cpu_linear_matches_the_reference(dtype, rows):
    """Eagerly and in a compiled inference graph (one row: the fused multiply-sum); fp32 to summation order,
    bf16 to one rounding of the output."""
    x = torch.randn(rows, 64).to(dtype)
    q, scale = reference.quantize_int8(torch.randn(40, 64), dtype)
    expected = reference.int8_linear(x, q, scale)
    tolerance = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2**-7, atol=1e-3)
    torch.testing.assert_close(int8_weights.linear(x, q, scale), expected, **tolerance)
    with torch.no_grad():
        compiled = torch.compile(int8_weights.linear, fullgraph=True)(x, q, scale)
    torch.testing.assert_close(compiled, expected, **tolerance)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("counts", [[0, 1, 0, 1], [2, 0, 3, 1], [0, 0, 0, 0]], ids=["one_token", "batch", "empty"])
def test_cpu_grouped_mm_matches_the_reference(dtype, counts):
    offs = torch.tensor(counts).cumsum(0).to(torch.int32)
    x = torch.randn(sum(counts), 32).to(dtype)
    q, scale = reference.quantize_int8(torch.randn(len(counts), 24, 32), dtype)
    expected = reference.int8_grouped_mm(x, q, scale, offs)
    tolerance = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2**-7, atol=1e-3)
    torch.testing.assert_close(int8_weights.grouped_mm(x, q, scale, offs), expected, **tolerance)
    with torch.no_grad():
        compiled = torch.compile(int8_weights.grouped_mm, fullgraph=True)(x, q, scale, offs)
    torch.testing.assert_close(compiled, expected, **tolerance)


def float_model(config=None) -> Mixtral:
    torch.manual_seed(0)
    model = Mixtral(config or small_config(), get_backend("cpu"))
    model.init_weights()
    return model.eval()


def int8_model(source, ops: Ops | None = None, dtype: torch.dtype = torch.float32) -> Mixtral:
    """An int8 model filled from source (a checkpoint directory, or a model in memory) the way generate loads one:
    built on meta, then each tensor quantized as it is read."""
    config = checkpoint_config(source) if isinstance(source, Path) else source.config
    model = build_on_meta(config, ops or get_backend("cpu"), dtype=dtype, layout=INT8)
    materialize(model, model, "cpu", init_from=source)
    return model.eval()


def dequantized(model: Mixtral, int8: Mixtral) -> Mixtral:
    """A float copy of model whose int8-held weights are the int8 model's q * scale."""
    copy = float_model(model.config)
    held, buffers = dict(int8.named_parameters()), dict(int8.named_buffers())
    with torch.no_grad():
        for name, param in copy.named_parameters():
            if int8_weight(name):
                param.copy_(held[name].float() * buffers[int8_scale_name(name)].float().unsqueeze(-1))
            else:
                param.copy_(held[name])
    return copy


def test_the_int8_model_holds_what_the_predicate_names():
    model = float_model()
    int8 = int8_model(ModuleSource(model))
    as_int8 = {name for name, p in int8.named_parameters() if p.dtype == torch.int8}
    assert as_int8 == {name for name, _ in model.named_parameters() if int8_weight(name)}
    assert not any(p.requires_grad for name, p in int8.named_parameters() if name in as_int8)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_int8_logits_equal_the_dequantized_float_model(backend):
    """fp32 activations: the int8 model computes exactly the float model holding q * scale (to fp32 rounding),
    through the CPU's ops and through the reference's."""
    model = float_model()
    ops = get_backend("cpu") if backend == "cpu" else Ops.reference()
    int8 = int8_model(ModuleSource(model), ops)
    tokens = torch.randint(0, model.config.vocab_size, (2, 9))
    with torch.no_grad():
        expected = dequantized(model, int8)(tokens).logits
        torch.testing.assert_close(int8(tokens).logits, expected, rtol=1e-5, atol=1e-5)
        # and the quantization itself stays close to the float weights
        assert (int8(tokens).logits - model(tokens).logits).abs().max() < 0.05 * model(tokens).logits.abs().max()


def test_compiled_int8_generation_gives_the_eager_tokens():
    model = float_model()
    int8 = int8_model(ModuleSource(model), dtype=torch.bfloat16)
    prompts = [[5, 17, 3, 44, 9], [8, 2]]
    expected = Generator(int8).generate(prompts, 8, stop_at_eos=False)
    torch._dynamo.reset()
    get_backend("cpu").compile(int8, dynamic=True, inference=True)
    assert Generator(int8).generate(prompts, 8, stop_at_eos=False) == expected


def test_int8_needs_the_dropless_dispatcher():
    from mixtral.config import MoEConfig

    with pytest.raises(MixtralError, match="int8 expert weights run with the dropless dispatcher"):
        Mixtral(small_config(), moe=MoEConfig(dispatcher="capacity", capacity_factor=1.25), layout=INT8)


CLI_CONFIG = dict(vocab_size=32000, hidden_size=32, intermediate_size=24, num_attention_heads=4)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("float")
    save_hf(float_model(small_config(**CLI_CONFIG)), path)
    return path


def generated(capsys, *args: str) -> str:
    assert main(["generate", "--prompt", "The capital of France", "--max-tokens", "10", *args]) == 0
    return capsys.readouterr().out


def test_convert_stores_int8_that_generate_loads(hf_dir, tmp_path, capsys):
    """convert --dtype int8 writes the same int8 weights and scales that loading quantizes; generate --dtype int8
    gives the same tokens from either, and --dtype bf16 reads the int8 checkpoint dequantized."""
    out = tmp_path / "int8"
    assert main(["convert", "--input", str(hf_dir), "--output", str(out), "--to", "native", "--dtype", "int8"]) == 0
    assert "int8 weights" in capsys.readouterr().out
    from_float = int8_model(ModuleSource(float_model(small_config(**CLI_CONFIG))), dtype=torch.bfloat16)
    from_int8 = int8_model(out, dtype=torch.bfloat16)
    for (name, a), (_, b) in zip(from_float.state_dict().items(), from_int8.state_dict().items()):
        assert torch.equal(a, b), name
    assert generated(capsys, "--model", str(hf_dir), "--dtype", "int8") == generated(
        capsys, "--model", str(out), "--dtype", "int8"
    )
    dequant = build_on_meta(from_float.config, get_backend("cpu"))
    materialize(dequant, dequant, "cpu", init_from=out)
    params = dict(from_int8.named_parameters())
    scales = dict(from_int8.named_buffers())
    gate_up = "layers.1.mlp.experts.gate_up_proj"
    torch.testing.assert_close(
        dict(dequant.named_parameters())[gate_up],
        params[gate_up].float() * scales[int8_scale_name(gate_up)].float().unsqueeze(-1),
        rtol=0,
        atol=0,
    )


def test_convert_int8_errors(hf_dir, tmp_path, capsys):
    def refused(args: list[str], message: str) -> None:
        assert main(["convert", *args]) != 0
        assert message in capsys.readouterr().err

    given = ["--input", str(hf_dir), "--output", str(tmp_path / "x")]
    refused([*given, "--to", "hf", "--dtype", "int8"], "is written as a native checkpoint: use --to native")
    refused([*given, "--to", "native", "--dtype", "int8", "--verify"], "without --verify")
    stored = tmp_path / "int8"
    assert main(["convert", "--input", str(hf_dir), "--output", str(stored), "--to", "native", "--dtype", "int8"]) == 0
    refused(["--input", str(stored), "--output", str(tmp_path / "back"), "--to", "hf"], "holds int8 weights")


def test_dataclass_layout_keeps_int8_with_parallel_fields():
    """generate under --ep / --pp adds int8 to the parallel layout it builds."""
    layout = dataclasses.replace(ModelLayout(experts=2), int8=True)
    model = Mixtral(small_config(num_local_experts=4), layout=layout)
    assert model.layers[0].mlp.experts.gate_up_proj.dtype == torch.int8
    assert model.layers[0].mlp.experts.gate_up_proj.shape[0] == 2
