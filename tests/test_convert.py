"""`mixtral-run convert`: every direction with --verify, a verify that catches a broken mapping, each bad input
as a one-line error (exit 2), layout flags checked, and a conversion whose peak memory stays far below the model."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file

from mixtral.checkpoint import hf, megatron, native
from mixtral.checkpoint.hf import save_hf
from mixtral.cli import main
from mixtral.model import Mixtral

from conftest import big_random_model, small_config

SHARD_BYTES = 30_000  # several HF shards for the small model


def random_model(config) -> Mixtral:
    model = Mixtral(config)
    model.init_weights(0.1)
    with torch.no_grad():
        for layer in model.layers:
            layer.input_layernorm.weight.uniform_(0.5, 1.5)
    return model


@pytest.fixture
def hf_dir(tmp_path):
    model = random_model(small_config())
    save_hf(model, tmp_path / "hf", max_shard_bytes=SHARD_BYTES)
    return tmp_path / "hf", model


def convert(*args) -> int:
    return main(["convert", *map(str, args)])


def test_every_direction_verifies(hf_dir, capsys):
    src, model = hf_dir
    root = src.parent
    assert convert("--input", src, "--output", root / "native", "--to", "native", "--tp", 2, "--ep", 5, "--verify") == 0
    out = capsys.readouterr().out
    assert "tensors, hf -> native -> hf" in out and "logits, fixed prompt (fp32)" in out
    assert "MISMATCH" not in out and out.count(" ok") == 2
    manifest = native.read_manifest(root / "native")
    assert manifest.layout == {"tp": 2, "pp": 1, "ep": 5} and manifest.config == model.config

    assert (
        convert("--input", root / "native", "--output", root / "meg", "--to", "megatron", "--dtype", "bf16", "--verify")
        == 0
    )
    assert "native -> megatron -> native" in capsys.readouterr().out
    assert convert("--input", root / "meg", "--output", root / "hf2", "--to", "hf", "--verify") == 0
    assert convert("--input", root / "native", "--output", root / "hf3", "--to", "hf", "--verify") == 0
    assert convert("--input", src, "--output", root / "meg2", "--to", "megatron", "--verify") == 0
    assert convert("--input", root / "meg2", "--output", root / "native2", "--to", "native", "--verify") == 0
    out = capsys.readouterr().out
    assert "MISMATCH" not in out and out.count(" ok") == 8

    bf16 = load_file(root / "hf2" / hf.SINGLE)  # hf -> native -> megatron (bf16) -> hf: every expert in place
    for j in range(model.config.num_local_experts):
        w1, w3 = model.layers[1].mlp.experts.gate_up_proj[j].detach().chunk(2)
        assert torch.equal(bf16[f"model.layers.1.block_sparse_moe.experts.{j}.w1.weight"], w1.bfloat16())
        assert torch.equal(bf16[f"model.layers.1.block_sparse_moe.experts.{j}.w3.weight"], w3.bfloat16())
    assert json.loads((root / "hf2" / hf.CONFIG).read_text())["torch_dtype"] == "bfloat16"
    assert not any(p.name.startswith(".") for p in root.iterdir())  # temporaries and verify dirs are gone


def test_verify_catches_a_wrong_mapping(hf_dir, capsys, monkeypatch):
    src, _ = hf_dir

    def swapped(qkv, config):  # k and v exchanged: a plausible interleaving bug
        q, k, v = split_qkv(qkv, config)
        return q, v, k

    split_qkv = megatron.split_qkv
    monkeypatch.setattr(megatron, "split_qkv", swapped)
    assert convert("--input", src, "--output", src.parent / "meg", "--to", "megatron", "--verify") == 1
    captured = capsys.readouterr()
    assert "MISMATCH" in captured.out and "self_attn.k_proj.weight' differs" in captured.out
    assert "does not reproduce the input" in captured.err


def corrupt_truncate(path):
    shard = sorted(path.glob("model-*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[:-100])
    return shard.name, "truncated or corrupt"


def corrupt_shape(path):
    shard = sorted(path.glob("model-*.safetensors"))[0]
    tensors = load_file(shard)
    key = next(iter(tensors))
    tensors[key] = torch.zeros(3, 3)
    save_file(tensors, shard)
    return key, "has shape [3, 3] but config.json implies"


def corrupt_missing_shard(path):
    shard = sorted(path.glob("model-*.safetensors"))[-1]
    shard.unlink()
    return shard.name, "is missing from"


def corrupt_architecture(path):
    config = json.loads((path / hf.CONFIG).read_text()) | {"model_type": "llama"}
    (path / hf.CONFIG).write_text(json.dumps(config))
    return hf.CONFIG, "model_type is 'llama', not 'mixtral'"


@pytest.mark.parametrize("corrupt", [corrupt_truncate, corrupt_shape, corrupt_missing_shard, corrupt_architecture])
def test_bad_hf_input_is_one_clean_error(hf_dir, capsys, corrupt):
    src, _ = hf_dir
    named, message = corrupt(src)
    assert convert("--input", src, "--output", src.parent / "out", "--to", "native") == 2
    err = capsys.readouterr().err
    assert err.startswith("mixtral-run convert: error: ") and err.count("\n") == 1
    assert named in err and message in err
    assert not (src.parent / "out").exists()


def test_bad_native_input(hf_dir, capsys):
    src, _ = hf_dir
    assert convert("--input", src, "--output", src.parent / "nat", "--to", "native") == 0
    manifest = src.parent / "nat" / native.MANIFEST
    data = json.loads(manifest.read_text())
    manifest.write_text(json.dumps(data | {"format_version": 2}))
    assert convert("--input", src.parent / "nat", "--output", src.parent / "out", "--to", "hf") == 2
    assert f"{manifest}: format_version 2 is not supported" in capsys.readouterr().err
    manifest.write_text(json.dumps(data | {"architecture": "DeepseekV3ForCausalLM"}))
    assert convert("--input", src.parent / "nat", "--output", src.parent / "out", "--to", "hf") == 2
    assert "architecture is 'DeepseekV3ForCausalLM'" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["--to", "native", "--ep", 3],
            "--ep=3: the model's num_local_experts (5) is not divisible by ep (3); choose ep from [1, 5]",
        ),
        (["--to", "native", "--tp", 4], "--tp=4: the model's num_attention_heads (6) is not divisible by tp (4)"),
        (["--to", "native", "--pp", 0], "--pp must be a positive integer, got 0"),
        (["--to", "hf", "--tp", 2], "--tp: a layout is recorded only in a native checkpoint's manifest"),
    ],
)
def test_layout_flags_checked(hf_dir, capsys, args, message):
    src, _ = hf_dir
    assert convert("--input", src, "--output", src.parent / "out", *args) == 2
    assert message in capsys.readouterr().err


def test_output_paths_guarded(hf_dir, capsys):
    src, _ = hf_dir
    assert convert("--input", src, "--output", src, "--to", "hf") == 2
    assert "overlaps --input" in capsys.readouterr().err
    other = src.parent / "precious"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    assert convert("--input", src, "--output", other, "--to", "hf") == 2
    assert "exists and is not a hf checkpoint" in capsys.readouterr().err
    assert (other / "notes.txt").read_text() == "keep me"
    assert convert("--input", other, "--output", src.parent / "x", "--to", "hf") == 2
    assert "not a checkpoint mixtral-run knows" in capsys.readouterr().err


MEMORY_SCRIPT = textwrap.dedent("""
    import re, sys
    from pathlib import Path
    from mixtral.cli import main

    def status_mb(field):  # this process's own counters (ru_maxrss would include the parent's, kept across exec)
        return int(re.search(field + r":\\s+(\\d+) kB", Path("/proc/self/status").read_text()).group(1)) / 1024

    small, big, out = sys.argv[1:4]
    for to in ("native", "megatron"):  # warm up: imports and first-call allocations are fixed overhead
        assert main(["convert", "--input", small if to == "native" else out + "/small-native",
                     "--output", out + "/small-" + to, "--to", to]) == 0
    Path("/proc/self/clear_refs").write_text("5")  # peak RSS := current RSS
    base = status_mb("VmRSS")
    assert main(["convert", "--input", big, "--output", out + "/big-native", "--to", "native"]) == 0
    assert main(["convert", "--input", out + "/big-native", "--output", out + "/big-megatron", "--to", "megatron"]) == 0
    print(base, status_mb("VmHWM") - base)
""")


def test_conversion_streams_in_bounded_memory(hf_dir, tmp_path):
    """A ~210 MB model converts HF -> native -> Megatron with peak RSS growing by under a quarter of it."""
    model, model_mb = big_random_model()
    save_hf(model, tmp_path / "big", max_shard_bytes=64 * 2**20)
    expert = model.layers[2].mlp.experts.gate_up_proj[5].detach().clone()
    del model
    result = subprocess.run(
        [sys.executable, "-c", MEMORY_SCRIPT, str(hf_dir[0]), str(tmp_path / "big"), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    base_mb, growth_mb = map(float, result.stdout.split()[-2:])
    print(f"model {model_mb:.0f} MB, baseline RSS {base_mb:.0f} MB, conversion growth {growth_mb:.0f} MB")
    assert model_mb > 200 and growth_mb < model_mb / 4
    source = megatron.MegatronSource(tmp_path / "big-megatron")
    assert torch.equal(source.read("layers.2.mlp.experts.gate_up_proj", 5)[0], expert)


def test_convert_carries_the_tokenizer_files(hf_dir, capsys):
    """tokenizer.model and the HF tokenizer files next to the input arrive next to the output, whatever the format."""
    import shutil

    from mixtral.data.tokenizer import Tokenizer, default_tokenizer_path

    src, _ = hf_dir
    shutil.copyfile(default_tokenizer_path(), src / "tokenizer.model")
    (src / "tokenizer_config.json").write_text('{"model_max_length": 4096}')
    root = src.parent
    assert convert("--input", src, "--output", root / "native", "--to", "native") == 0
    assert "with tokenizer.model, tokenizer_config.json" in capsys.readouterr().out
    assert convert("--input", root / "native", "--output", root / "meg", "--to", "megatron") == 0
    assert convert("--input", root / "meg", "--output", root / "hf2", "--to", "hf") == 0
    for out in ("native", "meg", "hf2"):
        assert (root / out / "tokenizer.model").read_bytes() == (src / "tokenizer.model").read_bytes(), out
        assert (root / out / "tokenizer_config.json").read_text() == '{"model_max_length": 4096}', out
    assert Tokenizer(root / "hf2").encode("The with statement") == Tokenizer(src).encode("The with statement")


def test_a_training_run_directory_converts_its_latest_step(hf_dir, capsys):
    """--input takes what generate takes: a run directory (or checkpoints root) means the step `latest` names."""
    src, model = hf_dir
    run = src.parent / "run"
    (run / "checkpoints").mkdir(parents=True)
    src.rename(run / "checkpoints" / "step_00000010")
    (run / "checkpoints" / "latest").symlink_to("step_00000010")
    assert convert("--input", run, "--output", src.parent / "out", "--to", "hf") == 0
    assert "wrote hf checkpoint" in capsys.readouterr().out
    back = hf.load_hf_model(src.parent / "out", "cpu")
    for (name, a), (_, b) in zip(back.named_parameters(), model.named_parameters()):
        assert torch.equal(a, b), name
