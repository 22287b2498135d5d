"""The backend contract: registration through pluggy, auto selection, honest availability, op resolution."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from mixtral.backend import Availability, Backend, Ops, Registry, get_backend, hookimpl, registry
from mixtral.errors import MixtralError
from mixtral.kernels import reference
from mixtral.model import Mixtral
from tests.conftest import small_config


def test_builtin_backends_register_through_entry_points() -> None:
    names = set(registry().backends)
    assert {"cpu", "cuda", "hpu", "npu", "xla"} <= names
    cpu = registry().backends["cpu"]
    assert (cpu.device_type, cpu.dist_backend, cpu.availability.ok) == ("cpu", "gloo", True)


def test_unavailable_backends_say_why() -> None:
    for name in ("hpu", "npu", "xla"):
        backend = registry().backends[name]
        if backend.availability.ok:
            continue  # a machine that really has the hardware
        assert "not importable" in backend.availability.reason and "install" in backend.availability.reason
        with pytest.raises(MixtralError, match=f"backend '{name}' is not available here"):
            get_backend(name)


def test_auto_picks_the_available_backend_of_highest_priority() -> None:
    ranked = registry().by_priority()
    assert [b.name for b in ranked][:1] == ["cuda"] and ranked[-1].name == "cpu"  # cuda 50, xla 40, ..., cpu 0
    assert get_backend("auto").name == next(b.name for b in ranked if b.availability.ok)


def test_unknown_backend_lists_the_registered_ones() -> None:
    with pytest.raises(MixtralError, match="unknown backend 'nope'; registered backends: .*cpu"):
        get_backend("nope")


def test_broken_probe_is_unavailable_not_a_crash() -> None:
    class Broken(Backend):
        def probe(self) -> Availability:
            raise OSError("driver exploded")

    b = Broken(name="broken", device_type="cpu", dist_backend="gloo")
    assert not b.availability.ok and "driver exploded" in b.availability.reason


class CountingPlugin:
    """A third-party plugin whose backend counts calls to its ops, proving the model runs through them."""

    def __init__(self) -> None:
        self.calls: dict[str, int] = {}

    def counted(self, name: str):
        def op(*args, **kwargs):
            self.calls[name] = self.calls.get(name, 0) + 1
            return getattr(reference, name)(*args, **kwargs)

        return op

    @hookimpl
    def mixtral_register_backends(self, register) -> None:
        plugin = self

        class Counting(Backend):
            def build_ops(self) -> Ops:
                return Ops(**{name: plugin.counted(name) for name in Ops.__dataclass_fields__})

        register(Counting(name="counting", device_type="cpu", dist_backend="gloo"))


def test_in_process_plugin_runs_the_model_through_its_ops() -> None:
    reg = Registry()
    reg.load_entry_points()
    plugin = CountingPlugin()
    reg.register_plugin(plugin)
    backend = reg.get("counting")
    config = small_config()
    model = Mixtral(config, backend).eval()
    model.init_weights()
    expected = Mixtral(config).eval()
    expected.load_state_dict(model.state_dict())
    tokens = torch.randint(0, config.vocab_size, (2, 7))
    torch.testing.assert_close(model(tokens).logits, expected(tokens).logits, rtol=1e-5, atol=1e-6)
    layers = config.num_hidden_layers
    assert plugin.calls["attention"] == layers and plugin.calls["grouped_mm"] == 2 * layers
    assert plugin.calls["rms_norm"] == 2 * layers + 1 and plugin.calls["rope"] == 2 * layers
    assert plugin.calls["permute"] == plugin.calls["unpermute"] == plugin.calls["swiglu"] == layers


def test_duplicate_backend_names_are_rejected() -> None:
    reg = Registry()
    reg.load_entry_points()

    class Dup:
        @hookimpl
        def mixtral_register_backends(self, register) -> None:
            register(Backend(name="cpu", device_type="cpu", dist_backend="gloo"))

    reg.register_plugin(Dup())
    with pytest.raises(MixtralError, match="two plugins register a backend named 'cpu'"):
        reg.backends


def test_installed_third_party_package_registers_through_entry_points(tmp_path) -> None:
    """A separate distribution installed on sys.path registers via the `mixtral` entry-point group."""
    pkg = tmp_path / "site"
    (pkg / "mixtral_backend_demo").mkdir(parents=True)
    (pkg / "mixtral_backend_demo" / "__init__.py").write_text(
        textwrap.dedent("""
        from mixtral.backend import Backend, hookimpl

        @hookimpl
        def mixtral_register_backends(register):
            register(Backend(name="demo", device_type="cpu", dist_backend="gloo"))
    """)
    )
    dist = pkg / "mixtral_backend_demo-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: mixtral-backend-demo\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[mixtral]\ndemo = mixtral_backend_demo\n")
    code = "from mixtral.backend import get_backend; print(get_backend('demo').name)"
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(pkg), "PATH": "/usr/bin:/bin"},
        check=True,
    )
    assert out.stdout.strip() == "demo"


def test_backends_command_prints_the_table(capsys) -> None:
    from mixtral.cli import main

    assert main(["backends"]) == 0
    out = capsys.readouterr().out
    assert "cpu   yes" in out and "--backend auto selects:" in out
    assert main(["backends", "--backend", "nope"]) == 2
    assert "unknown backend 'nope'" in capsys.readouterr().err


THIRD_PARTY = """
import torch
from mixtral.backend import Backend, Capabilities, Device, hookimpl


class AcmeBackend(Backend):
    def peak_flops(self, device, dtype):
        return 2e12  # the Acme 1's datasheet


@hookimpl
def mixtral_register_backends(register):
    register(AcmeBackend(name="acme", device_type="cpu", dist_backend="gloo",
                         capabilities=Capabilities(auto_priority=100, fused_optimizer=True),
                         planner_devices=(Device("acme1", "Acme 1 48 GB", "acme", 48, 2000, 0.5, 400, 50, 16, 16),)))
"""


def test_a_third_party_device_is_planned_picked_and_measured_without_a_core_edit(tmp_path) -> None:
    """A plugin's backend declares its device and priority: `auto` picks it, the planner plans for its device,
    a recipe checks against it, and MFU uses its peak."""
    pkg = tmp_path / "site"
    (pkg / "mixtral_backend_acme").mkdir(parents=True)
    (pkg / "mixtral_backend_acme" / "__init__.py").write_text(THIRD_PARTY)
    dist = pkg / "mixtral_backend_acme-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: mixtral-backend-acme\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[mixtral]\nacme = mixtral_backend_acme\n")
    code = textwrap.dedent(f"""
        import json
        from mixtral.backend import get_backend
        from mixtral.config import ModelConfig
        from mixtral.planner import get_device, plan_layouts
        from mixtral.cli import main
        from mixtral.train.metrics import read_metrics

        print(get_backend("auto").name)
        plans = plan_layouts(ModelConfig.preset("8x7b"), get_device("acme1"), 64, 4096, 256)
        print(len(plans), plans[0].memory.device.label)
        assert main(["train", "--recipe", "cpu-tiny", "train.steps=2", "train.tensorboard=false", "eval.interval=0",
                     "checkpoint.interval=0", "model.num_hidden_layers=1", "seq_len=64", "batch.micro_batch=4",
                     "batch.global_batch=4", "train.output_dir={tmp_path / "run"}", "backend=auto"]) == 0
        print(json.dumps([r for r in read_metrics("{tmp_path / "run"}") if "mfu" in r]))
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(pkg), str(Path(__file__).resolve().parents[1])])}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    name, (count, label), metrics = lines[0], lines[1].split(" ", 1), lines[-1]
    assert name == "acme" and label == "Acme 1 48 GB" and int(count) > 0
    from mixtral.recipes import load_recipe

    flops = load_recipe("cpu-tiny", ["model.num_hidden_layers=1", "seq_len=64"]).model_config().flops_per_token(64)
    for record in json.loads(metrics):
        # acme's 2e12 peak; tokens_per_s is logged rounded to 0.1, the MFU from the unrounded rate (5 decimals)
        expected = flops * record["tokens_per_s"] / 2e12
        assert record["mfu"] > 0 and record["mfu"] == pytest.approx(expected, rel=1e-2, abs=1e-5)
