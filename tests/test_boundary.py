"""The core/backend boundary, checked on the source: the model names no process group, the core names no vendor, and
parallelism never reaches into modules it did not make.

Device-specific code belongs to backends/ (the Backend object, its op table) and kernels/ (the ops); the core
(mixtral/) talks to it through those two. The host ("cpu") is not a vendor: the core stages tensors there.
"""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

from mixtral.model.attention import Attention
from mixtral.parallel.tensor_parallel import block_plan

ROOT = Path(__file__).resolve().parent.parent
CORE = ROOT / "mixtral"
VENDOR = re.compile(
    r"\b(cuda|xla|tpu|hpu|gaudi|npu|ascend|mps|xpu|nccl|hccl|triton|torch_xla|torch_npu|"
    r"habana_frameworks|transformer_engine)\b",
    re.IGNORECASE,
)


def core_files(*under: str) -> list[Path]:
    """The core's Python files (mixtral/backends and mixtral/kernels are links to the top-level folders)."""
    files = [
        p
        for p in sorted(CORE.joinpath(*under).rglob("*.py"))
        if not any(part in ("backends", "kernels") for part in p.relative_to(CORE).parts)
    ]
    assert files, f"no Python files under {CORE.joinpath(*under)}"
    return files


def docstrings(tree: ast.AST) -> set[int]:
    return {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }


def imported_modules(tree: ast.AST) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            found += [(node.lineno, node.module)] + [(node.lineno, f"{node.module}.{a.name}") for a in node.names]
    return found


def test_the_model_imports_no_torch_distributed():
    offending = [
        f"{path.relative_to(ROOT)}:{line}: {name}"
        for path in core_files("model")
        for line, name in imported_modules(ast.parse(path.read_text()))
        if name == "torch.distributed" or name.startswith("torch.distributed.")
    ]
    assert not offending, (
        "mixtral/model must name no process group: pass collectives in through ModelLayout\n" + "\n".join(offending)
    )


def test_no_vendor_names_in_the_core_code():
    """Comments and docstrings may explain a vendor's design; string literals and imports may not name one."""
    offending = []
    for path in core_files():
        tree = ast.parse(path.read_text())
        skip = docstrings(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip:
                if VENDOR.search(node.value):
                    offending.append(f"{path.relative_to(ROOT)}:{node.lineno}: {node.value!r}")
        offending += [
            f"{path.relative_to(ROOT)}:{line}: import {name}"
            for line, name in imported_modules(tree)
            if VENDOR.search(name)
        ]
    assert not offending, "device-specific names belong in backends/ or kernels/:\n" + "\n".join(offending)


def test_parallelism_assigns_no_attributes_on_foreign_objects():
    """mixtral/parallel lays the model out by wrapping, hooks, DTensor plans and what the model is built with: an
    assignment `module.attr = ...` (or setattr) on anything but its own object (self, an autograd ctx) is patching."""
    offending = []
    for path in core_files("parallel"):
        for node in ast.walk(ast.parse(path.read_text())):
            targets = (
                node.targets
                if isinstance(node, ast.Assign)
                else [node.target]
                if isinstance(node, (ast.AugAssign, ast.AnnAssign))
                else []
            )
            for target in targets:
                for sub in ast.walk(target):
                    if (
                        isinstance(sub, ast.Attribute)
                        and isinstance(sub.ctx, ast.Store)
                        and not (isinstance(sub.value, ast.Name) and sub.value.id in ("self", "ctx"))
                    ):
                        offending.append(f"{path.relative_to(ROOT)}:{node.lineno}: {ast.unparse(target)}")
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "setattr":
                offending.append(f"{path.relative_to(ROOT)}:{node.lineno}: {ast.unparse(node)}")
    assert not offending, "attribute patching in mixtral/parallel:\n" + "\n".join(offending)


def test_tensor_parallel_lays_out_every_positional_input_of_attention():
    """The TP plan lays out attention's positional inputs; the rest are keyword-only, passed through unchanged. A new
    positional argument fails here instead of reaching the attention unsharded."""
    params = list(inspect.signature(Attention.forward).parameters.values())[1:]  # after self
    positional = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    prepare = block_plan(sp=True)["self_attn"]
    assert len(prepare.input_layouts) == len(positional) == 1 and positional == ["x"], (positional, prepare)
    assert all(p.kind == p.KEYWORD_ONLY for p in params[1:])
