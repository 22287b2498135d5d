"""How the project installs: the source tree shadows no installed package, and a wheel carries its recipes."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run(args: list[str], cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_repository_root_does_not_shadow_hugging_face_kernels():
    """From the root (sys.path[0] is the checkout), transformers' own `kernels` import resolves to the installed
    package, and its Mixtral builds and runs."""
    code = (
        "import kernels, torch\n"
        "from transformers import MixtralConfig, MixtralForCausalLM\n"
        "import mixtral.kernels.reference, mixtral.backends.cpu\n"
        "config = MixtralConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,\n"
        "                       num_key_value_heads=2, vocab_size=100, num_local_experts=4)\n"
        "logits = MixtralForCausalLM(config)(torch.tensor([[1, 2, 3]])).logits\n"
        "print(kernels.__file__, tuple(logits.shape))\n"
    )
    result = run([sys.executable, "-c", code], cwd=ROOT)
    assert result.returncode == 0, result.stderr
    where, shape = result.stdout.split(" ", 1)
    assert not Path(where).resolve().is_relative_to(ROOT), where
    assert shape.strip() == "(1, 3, 100)"


@pytest.mark.slow
def test_wheel_installed_outside_the_checkout_finds_its_recipes_and_backends(tmp_path):
    wheels, target, elsewhere, source = (tmp_path / name for name in ("wheels", "site", "elsewhere", "source"))
    elsewhere.mkdir()
    tracked = run(["git", "ls-files"], ROOT).stdout.split()  # a copy: setuptools builds inside the source tree
    for name in tracked:
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        path = ROOT / name
        if path.is_symlink():
            (source / name).symlink_to(path.readlink())
        else:
            shutil.copy2(path, source / name)
    built = run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(wheels), str(source)], tmp_path
    )
    assert built.returncode == 0, built.stderr
    wheel = next(wheels.glob("mixtral_run-*.whl"))
    installed = run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--quiet", "--target", str(target), str(wheel)], tmp_path
    )
    assert installed.returncode == 0, installed.stderr
    env = {**os.environ, "PYTHONPATH": str(target)}
    where = run([sys.executable, "-c", "import mixtral; print(mixtral.__file__)"], elsewhere, env)
    assert Path(where.stdout.strip()).is_relative_to(target), where.stdout + where.stderr
    listed = run([sys.executable, "-m", "mixtral.cli", "recipe", "list"], elsewhere, env)
    assert listed.returncode == 0, listed.stderr
    names = {line.split()[0] for line in listed.stdout.splitlines()[1:] if line.strip()}
    assert names == {p.stem for p in (ROOT / "recipes").glob("*.yaml")}
    shown = run([sys.executable, "-m", "mixtral.cli", "recipe", "show", "cpu-tiny"], elsewhere, env)
    assert shown.returncode == 0 and "cpu-tiny" in shown.stdout, shown.stderr
    backends = run([sys.executable, "-m", "mixtral.cli", "backends"], elsewhere, env)
    assert backends.returncode == 0 and "--backend auto selects: cpu" in backends.stdout, backends.stderr
