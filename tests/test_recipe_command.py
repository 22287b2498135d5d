"""`mixtral-run recipe list | show | validate | plan`, and bad recipes rejected with the key and the fix."""

from __future__ import annotations

import argparse

import pytest
import yaml

from mixtral import recipe_command
from mixtral.cli import main
from mixtral.errors import MixtralError
from mixtral.recipes import RECIPES_DIR, load_recipe, recipe_from_dict


def run(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    recipe_command.add_arguments(parser)
    return recipe_command.run(parser.parse_args(argv))


def test_list_shows_every_recipe(capsys):
    assert run("list") == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["name", "model", "devices", "layout", "dispatcher", "device", "mode"]
    rows = {line.split()[0]: line.split() for line in out[1:]}
    assert set(rows) == {p.stem for p in RECIPES_DIR.glob("*.yaml")}
    assert rows["gaudi2-8x7b-32hpu-capacity-bins"][1:] == [
        "8x7b",
        "32",
        "dp4tp8pp1cp1ep1etp8+sp",
        "capacity_bins",
        "gaudi2",
        "train",
    ]
    assert rows["cuda-8x7b-infer-tp1ep1pp2"][-1] == "inference"


def test_show_prints_the_resolved_recipe_that_loads_back(capsys):
    assert run("show", "ascend-8x7b-tp8pp2cp4", "train.steps=7") == 0
    data = yaml.safe_load(capsys.readouterr().out)
    assert data["model"]["hidden_size"] == 4096 and data["train"]["steps"] == 7
    assert data["parallel"]["cp_algo"] == "ring" and data["hardware"] == {"device": "910b", "devices": 64, "nodes": 8}
    shown = recipe_from_dict(data)
    original = load_recipe("ascend-8x7b-tp8pp2cp4", ["train.steps=7"])
    assert shown.model_config() == original.model_config()
    assert shown.parallel == original.parallel and shown.moe == original.moe and shown.train == original.train
    assert shown.hardware == original.hardware and shown.schedule == original.schedule


def test_validate_prints_checks_and_tables(capsys):
    assert run("validate", "cuda-8x7b-tp1ep8pp4") == 0
    out = capsys.readouterr().out
    assert "ok  world size 32 = dp 8 x tp 1 x pp 4 x cp 1" in out
    assert "memory per device" in out and "estimated step time" in out
    assert out.rstrip().endswith("recipe cuda-8x7b-tp1ep8pp4: valid")


def test_cli_exits_2_with_the_fix(capsys):
    assert main(["recipe", "validate", "cuda-8x7b-tp1ep8pp4", "parallel.ep=3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mixtral-run recipe: error: ") and "choose ep from" in err and "Traceback" not in err


BAD = [
    # (recipe, overrides, --devices, expected message: the key and the fix)
    ("cuda-8x7b-tp1ep8pp4", ["parallel.tpp=2"], None, r"unknown recipe key 'parallel.tpp' \(did you mean 'tp'\?\)"),
    ("cuda-8x7b-tp1ep8pp4", ["parallel.dp=4"], None, r"does not equal the world size 32; set parallel.dp to 8"),
    (
        "ascend-8x7b-tp8pp2cp4",
        ["parallel.tp=3", "parallel.etp=1"],
        24,
        r"parallel.tp=3: the model's num_attention_heads \(32\).*choose tp from \[1, 2, 4, 8\]",
    ),
    (
        "cuda-8x7b-tp1ep8pp4",
        ["parallel.pp=3", "parallel.dp=8"],
        24,
        r"parallel.pp=3: the model's num_hidden_layers \(32\).*choose pp from",
    ),
    ("cuda-8x7b-tp1ep8pp4", ["parallel.ep=3"], None, r"parallel.ep \(3\).*choose ep from"),
    ("gaudi2-8x7b-32hpu-capacity-bins", ["parallel.etp=3"], None, r"parallel.etp \(3\) must divide parallel.tp"),
    ("ascend-8x7b-tp8pp2cp4", ["seq_len=32760"], None, r"32760 is not divisible by cp x tp.*multiple of 32"),
    (
        "gaudi2-8x7b-32hpu-capacity-bins",
        ["moe.capacity_factor=1.25"],
        None,
        r"moe.capacity_factor is set but moe.dispatcher is 'capacity_bins'; remove capacity_factor",
    ),
    (
        "cuda-8x7b-tp1ep8pp4",
        ["parallel.pp=1", "parallel.dp=32"],
        None,
        r"does not fit on NVIDIA H100.*activation_checkpointing=full",
    ),
    ("cuda-8x7b-infer-tp1ep1pp2", ["parallel.pp=1"], 1, r"largest part is weights.*parallel.pp=2 on 2 devices"),
    (
        "tpu-v5p-8x22b-spmd",
        ["moe.dispatcher=dropless", "moe.capacity_factor=null"],
        None,
        r"'moe.dispatcher': 'dropless'.*backend 'xla'.*SPMD.*moe.dispatcher=capacity with moe.capacity_factor=1.25",
    ),
    (
        "gaudi2-8x7b-32hpu-capacity-bins",
        ["moe.dispatcher=dropless", "moe.capacity_bins=null"],
        None,
        r"backend 'hpu' cannot run \(it runs static-shape graphs\).*capacity_bins",
    ),
    ("cuda-8x7b-tp1ep8pp4", ["backend=rocm"], None, r"recipe key 'backend': unknown backend 'rocm'"),
    ("cuda-8x7b-tp1ep8pp4", ["seq_len=65536"], None, r"exceeds the model's max_position_embeddings.*lower seq_len"),
    ("cuda-8x7b-tp1ep8pp4", ["batch.global_batch=100"], None, r"batch.global_batch \(100\) must be a multiple"),
    ("cuda-8x7b-tp1ep8pp4", ["precision=fp16"], None, r"recipe key 'precision' expects one of fp32, bf16, bf16_master"),
    ("cuda-8x7b-tp1ep8pp4", ["hardware.devices=16"], None, r"does not equal the world size 16; set parallel.dp to 4"),
    (
        "cuda-8x7b-tp1ep8pp4",
        ["hardware.nodes=3"],
        None,
        r"hardware.nodes=3: 32 devices on h100 \(8 per node\) need 4 nodes; set hardware.nodes to that",
    ),
    (
        "cuda-8x7b-tp1ep8pp4",
        ["hardware.device=h200"],
        None,
        r"'hardware.device' expects one of h100, v5p, gaudi2, 910b, cpu",
    ),
    (
        "gaudi2-8x7b-32hpu-capacity-bins",
        ["parallel.zero=0"],
        None,
        r"parallel.zero=0 \(DDP\) does not compose with tensor parallelism; set parallel.zero to 1, 2 or 3",
    ),
    (
        "cuda-8x7b-tp1ep8pp4",
        ["schedule.decay_steps=100"],
        None,
        r"'schedule.decay_steps' \(100\) must be larger than the warmup \(500 steps\)",
    ),
    (
        "cuda-8x7b-infer-tp1ep1pp2",
        ["hardware.device=910b", "parallel.pp=1", "hardware.devices=1"],
        None,
        r"does not fit on Huawei Ascend 910B 64 GB.*largest part is weights",
    ),
]


@pytest.mark.parametrize("name,overrides,devices,message", BAD, ids=[" ".join(b[1]) for b in BAD])
def test_bad_recipes_are_rejected_with_key_and_fix(name, overrides, devices, message):
    argv = ["validate", name, *overrides] + (["--devices", str(devices)] if devices else [])
    with pytest.raises(MixtralError, match=message):
        run(*argv)


def test_wrong_node_count_is_rejected():
    with pytest.raises(MixtralError, match=r"hardware.nodes=4: 64 devices on h100 \(8 per node\) need 8 nodes"):
        run("validate", "cuda-8x7b-tp1ep8pp4", "parallel.dp=16", "--devices", "64")


def test_plan_lists_fitting_layouts_fastest_first(capsys):
    assert (
        run("plan", "--devices", "32", "--device-type", "h100", "--model", "8x7b", "--seq", "4096", "--top", "5") == 0
    )
    lines = capsys.readouterr().out.splitlines()
    assert "global batch 1024" in lines[0] and "layouts fit" in lines[0]
    steps = [float(line.split()[5]) for line in lines[2:]]
    assert len(steps) == 5 and steps == sorted(steps)
    assert all(float(line.split()[4]) <= 80 for line in lines[2:])
    with pytest.raises(MixtralError, match=r"no layout of 2 x h100 fits 8x22b.*use more devices"):
        run("plan", "--devices", "2", "--device-type", "h100", "--model", "8x22b")
    with pytest.raises(MixtralError, match=r"unknown device type 'a100'; choose one of: h100, v5p, gaudi2, 910b, cpu"):
        run("plan", "--devices", "8", "--device-type", "a100")
