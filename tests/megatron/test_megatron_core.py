"""Our Megatron torch_dist checkpoints against the real megatron-core 0.19, both ways, as Megatron-LM runs it.

megatron-core's GPTModel (built as Megatron-LM builds it for MoE: get_gpt_decoder_block_spec, local layer spec; CPU,
fp32) loads our export under dist_checkpointing's default strictness and computes transformers' logits on the same
weights; what its own dist_checkpointing.save writes converts to HF with our plain CLI and gives its logits back,
and our export of those weights holds exactly its keys; a padded vocabulary loads into a model built with the padded
size; the Transformer Engine spec, which needs CUDA to build, asks for exactly what --megatron-spec te writes.

Runs in ci/megatron.sh's venv; where megatron-core is not installed the module skips.
"""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("megatron.core", reason="megatron-core is not installed: these tests run in ci/megatron.sh's venv")

from megatron.core import dist_checkpointing  # noqa: E402
from megatron.core.dist_checkpointing.dict_utils import nested_values  # noqa: E402
from megatron.core.dist_checkpointing.mapping import ShardedObject  # noqa: E402
from megatron.core.extensions import transformer_engine as te_modules  # noqa: E402
from megatron.core.extensions import transformer_engine_spec_provider as te_provider  # noqa: E402
from megatron.core.models.gpt import GPTModel, gpt_layer_specs  # noqa: E402
from megatron.core.transformer.identity_op import IdentityOp  # noqa: E402
from megatron.core.transformer.moe.experts import TEGroupedMLP  # noqa: E402
from megatron.core.transformer.moe.moe_layer import MoELayer  # noqa: E402
from megatron.core.transformer.transformer_config import TransformerConfig  # noqa: E402
from torch.distributed.checkpoint.metadata import TensorStorageMetadata  # noqa: E402

from mixtral.checkpoint import megatron  # noqa: E402
from mixtral.checkpoint.hf import save_hf  # noqa: E402
from mixtral.checkpoint.native import read_dcp_metadata  # noqa: E402
from mixtral.cli import main  # noqa: E402
from mixtral.config import ModelConfig  # noqa: E402
from mixtral.model import Mixtral  # noqa: E402
from mixtral.model.transformer import parameter_shapes  # noqa: E402

from conftest import small_config  # noqa: E402

pytestmark = pytest.mark.usefixtures("megatron_world")
REPO = Path(__file__).resolve().parents[2]
CONFIG = small_config()  # vocabulary 101: Megatron-LM's default padding (128 x tp) changes it


def transformer_config(config: ModelConfig, **overrides: object) -> TransformerConfig:
    """megatron-core's TransformerConfig of a Mixtral: fp32, built on the CPU."""
    c = config
    fields = dict(
        num_layers=c.num_hidden_layers,
        hidden_size=c.hidden_size,
        ffn_hidden_size=c.intermediate_size,
        num_attention_heads=c.num_attention_heads,
        num_query_groups=c.num_key_value_heads,
        kv_channels=c.head_dim,
        num_moe_experts=c.num_local_experts,
        moe_router_topk=c.num_experts_per_tok,
        normalization="RMSNorm",
        layernorm_epsilon=c.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        moe_token_dispatcher_type="allgather",
        init_method_std=0.1,
        use_cpu_initialization=True,
        params_dtype=torch.float32,
        bf16=False,
    )
    return TransformerConfig(**(fields | overrides))


def gpt_model(config: ModelConfig, vocab_size: int | None = None) -> GPTModel:
    """megatron-core's GPTModel (eval mode) with Megatron-LM's MoE block spec (--transformer-impl local)."""
    mcore = transformer_config(config)
    spec = gpt_layer_specs.get_gpt_decoder_block_spec(mcore, use_transformer_engine=False, normalization="RMSNorm")
    return GPTModel(
        config=mcore,
        transformer_layer_spec=spec,
        vocab_size=vocab_size or config.vocab_size,
        max_sequence_length=config.max_position_embeddings,
        position_embedding_type="rope",
        rotary_base=int(config.rope_theta),
        share_embeddings_and_output_weights=config.tie_word_embeddings,
    ).eval()


def load_megatron(model: GPTModel, release: Path) -> None:
    """Megatron-LM's load path: the common state first, then the model's sharded state dict under "model" (the
    common state merges in beside it) with dist_checkpointing's default strictness, then a strict load_state_dict."""
    common = {"checkpoint_version": 3.0, "iteration": 0}
    assert dist_checkpointing.load_common_state_dict(str(release)) == common
    loaded = dist_checkpointing.load({"model": model.sharded_state_dict()}, str(release))
    assert loaded.keys() == {"model", *common}
    model.load_state_dict(loaded["model"])


def requested(model: GPTModel) -> set[str]:
    """The DCP keys model.sharded_state_dict() asks for: ShardedTensor keys, ShardedObject unique keys."""
    return {
        value.unique_key if isinstance(value, ShardedObject) else value.key
        for value in nested_values(model.sharded_state_dict())
    }


def stored(release: Path) -> dict[str, tuple]:
    """DCP key -> (shape, dtype) of each tensor, None for each object, read through our allow-list unpickler."""
    return {
        key: (tuple(md.size), md.properties.dtype) if isinstance(md, TensorStorageMetadata) else None
        for key, md in read_dcp_metadata(release).state_dict_metadata.items()
    }


def megatron_logits(model: GPTModel, tokens: torch.Tensor) -> torch.Tensor:
    """GPTModel's logits [batch, seq, vocab], causally masked (True = masked out)."""
    seq = tokens.shape[1]
    mask = torch.triu(torch.ones(1, 1, seq, seq, dtype=torch.bool), diagonal=1)
    with torch.no_grad():
        return model(tokens, torch.arange(seq)[None].expand_as(tokens), mask)


def transformers_logits(hf_dir: Path, tokens: torch.Tensor) -> torch.Tensor:
    from transformers import MixtralForCausalLM

    model = MixtralForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(tokens).logits


def assert_logits_close(got: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal within 1e-5 of the largest logit (fp32)."""
    assert got.shape == expected.shape
    worst = (got - expected).abs().max().item()
    assert worst <= 1e-5 * expected.abs().max().item(), f"max |diff| {worst:.3g}"


def convert(*args: object) -> None:
    assert main(["convert", *map(str, args)]) == 0


@pytest.fixture
def hf_model(tmp_path: Path) -> Path:
    """An HF directory of a random Mixtral whose norms are not all ones."""
    model = Mixtral(CONFIG)
    model.init_weights(0.1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
    save_hf(model, tmp_path / "hf")
    return tmp_path / "hf"


TOKENS = torch.randint(0, CONFIG.vocab_size, (2, 11), generator=torch.Generator().manual_seed(0))


def test_megatron_core_loads_our_export_and_matches_transformers(hf_model, tmp_path):
    convert("--input", hf_model, "--output", tmp_path / "meg", "--to", "megatron")
    release = tmp_path / "meg" / "release"
    model = gpt_model(CONFIG)
    assert stored(release).keys() - {megatron.COMMON_STATE} == requested(model)  # no more, no less
    load_megatron(model, release)
    assert_logits_close(megatron_logits(model, TOKENS), transformers_logits(hf_model, TOKENS))


def test_megatron_core_save_converts_with_the_cli(tmp_path):
    model = gpt_model(CONFIG)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
    saved = tmp_path / "mcore"
    saved.mkdir()
    dist_checkpointing.save(model.sharded_state_dict(), str(saved))
    (tmp_path / "config.json").write_text(json.dumps(CONFIG.to_hf_dict()))
    subprocess.run(
        [
            sys.executable,
            "-m",
            "mixtral.cli",
            "convert",
            "--input",
            saved,
            "--output",
            tmp_path / "hf",
            "--to",
            "hf",
            "--config",
            tmp_path / "config.json",
        ],
        cwd=REPO,
        check=True,
    )
    assert_logits_close(transformers_logits(tmp_path / "hf", TOKENS), megatron_logits(model, TOKENS))

    convert("--input", tmp_path / "hf", "--output", tmp_path / "meg", "--to", "megatron")
    assert stored(tmp_path / "meg" / "release") == stored(saved)  # megatron-core's keys, shapes and dtypes


@pytest.mark.parametrize("divisible_by, tp", [(128, 1), (32, 4)])
def test_padded_vocabulary_loads_into_a_padded_model(hf_model, tmp_path, divisible_by, tp):
    convert(
        "--input",
        hf_model,
        "--output",
        tmp_path / "meg",
        "--to",
        "megatron",
        "--make-vocab-size-divisible-by",
        divisible_by,
        "--megatron-tp",
        tp,
    )
    model = gpt_model(CONFIG, vocab_size=128)
    load_megatron(model, tmp_path / "meg" / "release")
    assert not model.embedding.word_embeddings.weight[CONFIG.vocab_size :].any()
    logits = megatron_logits(model, TOKENS)
    assert not logits[..., CONFIG.vocab_size :].any()  # the padded rows of the output layer are zeros
    assert_logits_close(logits[..., : CONFIG.vocab_size], transformers_logits(hf_model, TOKENS))


# Transformer Engine modules' state_dict entries, bias-free and without FP8 (TE's LayerNormLinear, Linear and RMSNorm
# each save an _extra_state; megatron-core saves TEDotProductAttention's state only for a learnable softmax offset)
TE_STATE = {
    te_modules.TELayerNormColumnParallelLinear: ("layer_norm_weight", "weight", "_extra_state"),
    te_modules.TERowParallelLinear: ("weight", "_extra_state"),
    te_modules.TEDotProductAttention: (),
    te_modules.TENorm: ("weight", "_extra_state"),
    te_provider._TENormWithResidual: ("weight", "_extra_state"),
    IdentityOp: (),
}


def test_transformer_engine_spec_asks_for_what_the_te_export_writes(monkeypatch, tmp_path):
    """megatron-core's own spec functions, run with Transformer Engine's provider (None without TE installed), give
    the modules; their names follow TE_STATE; TEGroupedMLP maps its grouped linears to SequentialMLP's keys."""
    monkeypatch.setattr(gpt_layer_specs, "TESpecProvider", te_provider.TESpecProvider)
    monkeypatch.setattr(gpt_layer_specs, "TENorm", te_modules.TENorm)
    monkeypatch.setattr(te_provider, "TEColumnParallelGroupedLinear", te_modules.TEColumnParallelLinear)  # TE present
    mcore = transformer_config(CONFIG, moe_grouped_gemm=True)
    block = gpt_layer_specs.get_gpt_decoder_block_spec(mcore, use_transformer_engine=True, normalization="RMSNorm")
    layer = block.layer_specs[0].submodules
    attention = layer.self_attention.submodules
    modules = {
        "decoder.layers.input_layernorm": layer.input_layernorm,  # IdentityOp: fused into linear_qkv
        "decoder.layers.self_attention.linear_qkv": attention.linear_qkv,
        "decoder.layers.self_attention.core_attention": attention.core_attention,
        "decoder.layers.self_attention.linear_proj": attention.linear_proj,
        "decoder.layers.pre_mlp_layernorm": layer.pre_mlp_layernorm,
        "decoder.final_layernorm": block.layer_norm,
    }
    expected = {f"{path}.{entry}" for path, module in modules.items() for entry in TE_STATE[module]}
    assert not [key for key in layer.sharded_state_dict_keys_map if key.startswith(("input_", "pre_mlp", "self_"))]

    assert layer.mlp.func is MoELayer and layer.mlp.keywords["submodules"].experts.func is TEGroupedMLP
    assert "experts.{name}." in inspect.getsource(TEGroupedMLP.sharded_state_dict)  # SequentialMLP's keys
    expected |= {"embedding.word_embeddings.weight", "decoder.layers.mlp.router.weight", "output_layer.weight"}
    expected |= {f"{module}.{entry}" for module in megatron.EXPERT_MODULES for entry in ("weight", "_extra_state")}

    state = {name: torch.zeros(shape) for name, shape in parameter_shapes(CONFIG).items()}
    megatron.save_megatron(
        tmp_path / "te",
        lambda name, expert: state[name] if expert is None else state[name][:1],
        CONFIG,
        torch.float32,
        spec="te",
    )
    written = {key.split("/")[0] for key in stored(tmp_path / "te" / "release")} - {"common_state"}
    assert written == expected
