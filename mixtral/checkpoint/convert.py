"""`mixtral-run convert`: move a Mixtral checkpoint between HF, native (DCP) and Megatron torch_dist.

Every format is read through a source that hands out one parameter (or one expert of it) at a time,
and the writers ask for each box only while writing it (DCP's writers for native and Megatron, a streaming
safetensors writer for HF), so every conversion holds about one tensor (one expert's weight) in memory.
`--verify` converts the output back to the input's format and compares every stored tensor, then
compares the logits of a fixed prompt computed from the input and from the output.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from mixtral.checkpoint import hf
from mixtral.checkpoint.loading import Source, detect_format, local_checkpoint, open_source, resolve_checkpoint
from mixtral.config import ModelConfig
from mixtral.errors import MixtralError
from mixtral.kernels import reference
from mixtral.model import Mixtral
from mixtral.model.linear import int8_scale_name, int8_weight
from mixtral.model.moe import EXPERT_SUFFIXES

# native and megatron import torch.distributed.checkpoint (seconds): loaded inside the functions that use
# them, so that building the mixtral-run parser stays cheap.
FORMATS = ("hf", "native", "megatron", "gguf")
DTYPE_NAMES = ("bf16", "fp32", "q8_0", "int8")  # q8_0: GGUF only; int8: native only (generate / serve --dtype int8)
PROMPT_LEN = 16
# what HF and SentencePiece tooling reads beside the weights
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--input",
        required=True,
        help="HF directory, native checkpoint (or checkpoints root), or Megatron torch_dist directory",
    )
    parser.add_argument(
        "--output", required=True, help="directory to write (replaced atomically); for gguf the .gguf file"
    )
    parser.add_argument("--to", required=True, choices=FORMATS, help="output format")
    for dim in ("tp", "pp", "ep"):
        parser.add_argument(
            f"--{dim}",
            type=int,
            default=None,
            help=f"{dim} degree recorded in a native checkpoint's manifest (checked against the model)",
        )
    parser.add_argument(
        "--dtype",
        default=None,
        help=f"output dtype, one of {', '.join(DTYPE_NAMES)} (default: the input's; gguf: bf16); q8_0 is for gguf",
    )
    parser.add_argument(
        "--config", default=None, help="HF config.json or preset for a Megatron input that has no config.json beside it"
    )
    parser.add_argument("--verify", action="store_true", help="round-trip tensor equality and fixed-prompt logits")
    parser.add_argument(
        "--megatron-spec",
        default=None,
        help="megatron output: the layer spec Megatron-LM builds, local or te (Transformer Engine; default local)",
    )
    parser.add_argument(
        "--make-vocab-size-divisible-by",
        type=int,
        default=None,
        help="megatron output: pad the vocabulary with zero rows to a multiple of this x "
        "--megatron-tp, as Megatron-LM does (its default is 128; default here 1: no padding)",
    )
    parser.add_argument(
        "--megatron-tp",
        type=int,
        default=None,
        help="megatron output: the tensor-parallel size Megatron-LM loads with, for the padding (default 1)",
    )


def boxes_for(name: str, shape: tuple[int, ...]) -> list:
    """Native checkpoints from a conversion store experts one by one, everything else whole."""
    from mixtral.checkpoint.native import whole

    if name.endswith(EXPERT_SUFFIXES):
        return [((e,) + (0,) * (len(shape) - 1), (1, *shape[1:])) for e in range(shape[0])]
    return [whole(shape)]


def build_model(source: Source, dtype: torch.dtype, round_to: torch.dtype | None = None) -> Mixtral:
    """A Mixtral holding source's weights in dtype (first rounded to round_to), built without a second copy."""
    state = {}
    for name in source.shapes:
        tensor = source.read(name)
        state[name] = (tensor if round_to is None else tensor.to(round_to)).to(dtype)
    return hf.assemble_model(source.config, state)


def _replaceable(path: Path, fmt: str) -> None:
    if not path.exists() or (path.is_dir() and not any(path.iterdir())):
        return
    try:
        found = detect_format(path)
    except MixtralError:
        found = None
    if found != fmt:
        raise MixtralError(
            f"{path}: exists and is not a {fmt} checkpoint (it would be replaced); choose another --output or remove it"
        )


def write(
    fmt: str,
    source: Source,
    out: Path,
    dtype: torch.dtype | None = None,
    layout: dict[str, int] | None = None,
    extra: dict[str, Any] | None = None,
    desc: str = "convert",
    megatron_spec: str = "local",
    vocab_multiple: int = 1,
    int8: bool = False,
) -> None:
    """Write source's parameters to out in format fmt (dtype None keeps the source's); megatron output is laid out
    for megatron_spec, its vocabulary padded to a multiple of vocab_multiple; int8 (native only) stores the
    projections and experts as int8 with their per-channel scales, the rest in dtype."""
    from mixtral.checkpoint import megatron, native

    _replaceable(out, fmt)
    dtype = dtype or source.dtype
    total = sum(math.prod(shape) for shape in source.shapes.values()) * dtype.itemsize
    with tqdm(total=total, unit="B", unit_scale=True, desc=desc, disable=None, file=sys.stderr) as bar:
        if fmt == "native":
            state = {}
            for name, shape in source.shapes.items():
                boxes = boxes_for(name, tuple(shape))
                if int8 and int8_weight(name):
                    state.update(int8_tensors(source, name, tuple(shape), boxes, dtype, bar.update))
                    continue
                state[name] = native.LazyTensor(
                    tuple(shape),
                    dtype,
                    boxes,
                    lambda box, name=name: source.read(name, _expert_of(name, box)),
                    bar.update,
                )
            native.save_native(
                out, state, config=source.config, layout=layout, manifest_extra=extra, file_per_item=True
            )
        elif fmt == "megatron":
            vocab_rows = megatron.padded_vocab_size(source.config.vocab_size, vocab_multiple)
            megatron.save_megatron(out, source.read, source.config, dtype, bar.update, megatron_spec, vocab_rows)
        else:
            hf.write_hf(out, source.config, source.shapes, source.read, dtype, on_write=bar.update)


def int8_tensors(
    source: Source, name: str, shape: tuple[int, ...], boxes: list, scale_dtype: torch.dtype, on_write: Callable
) -> dict[str, Any]:
    """Parameter name as int8 and its scales (reference.quantize_int8), each box quantized when DCP writes it."""
    from mixtral.checkpoint import native

    @functools.lru_cache(maxsize=1)  # the scales' box follows the weight's: quantized once for both
    def quantized(box: tuple) -> tuple[torch.Tensor, torch.Tensor]:
        return reference.quantize_int8(source.read(name, _expert_of(name, box)), scale_dtype)

    def scale_box(box: tuple) -> tuple:
        return box[0] + (0,), box[1] + (shape[-1],)

    return {
        name: native.LazyTensor(shape, torch.int8, boxes, lambda box: quantized(box)[0], on_write),
        int8_scale_name(name): native.LazyTensor(
            shape[:-1],
            scale_dtype,
            [(offsets[:-1], sizes[:-1]) for offsets, sizes in boxes],
            lambda box: quantized(scale_box(box))[1],
            on_write,
        ),
    }


def copy_tokenizer_files(sources: list[Path], out: Path) -> list[str]:
    """The tokenizer files found beside the input (the first folder of sources holding each), copied into out, each
    replaced atomically; returns their names."""
    copied = []
    for name in TOKENIZER_FILES:
        found = next((folder / name for folder in sources if (folder / name).is_file()), None)
        if found is not None and not (out / name).exists():
            tmp = out / f".{name}.tmp"
            shutil.copyfile(found, tmp)
            os.replace(tmp, out / name)
            copied.append(name)
    return copied


def _expert_of(name: str, box: tuple) -> int | None:
    return box[0][0] if name.endswith(EXPERT_SUFFIXES) else None


def target_layout(args: argparse.Namespace, config: ModelConfig) -> dict[str, int] | None:
    """The --tp/--pp/--ep layout for a native output, checked against the model's heads, experts and layers."""
    from mixtral.parallel.dims import ParallelDims

    given = {dim: getattr(args, dim) for dim in ("tp", "pp", "ep") if getattr(args, dim) is not None}
    if args.to != "native":
        if given:
            raise MixtralError(
                f"--{next(iter(given))}: a layout is recorded only in a native checkpoint's manifest; "
                f"{args.to} output has no layout field (it reshards on load); drop --tp/--pp/--ep"
            )
        return None
    layout = {"tp": given.get("tp", 1), "pp": given.get("pp", 1), "ep": given.get("ep", 1)}
    try:
        dims = ParallelDims(
            tp=layout["tp"],
            pp=layout["pp"],
            ep=layout["ep"],
            dp=layout["ep"],
            world_size=layout["tp"] * layout["pp"] * layout["ep"],
        )
        dims.validate_model(config)
    except MixtralError as exc:
        raise MixtralError(str(exc).replace("parallel.", "--")) from None
    return layout


def megatron_target(args: argparse.Namespace) -> tuple[str, int]:
    """--megatron-spec and the multiple the vocabulary is padded to (--make-vocab-size-divisible-by x --megatron-tp),
    checked; only a megatron output takes them."""
    sizes = {"--make-vocab-size-divisible-by": args.make_vocab_size_divisible_by, "--megatron-tp": args.megatron_tp}
    given = [flag for flag, value in {"--megatron-spec": args.megatron_spec, **sizes}.items() if value is not None]
    if args.to != "megatron":
        if given:
            raise MixtralError(
                f"{given[0]}: applies to --to megatron only ({args.to} output has no Megatron layer "
                f"spec or padded vocabulary); drop it"
            )
        return "local", 1
    from mixtral.checkpoint import megatron

    spec = args.megatron_spec or "local"
    megatron.layer_spec(spec)
    for flag, value in sizes.items():
        if value is not None and value < 1:
            raise MixtralError(
                f"{flag} {value}: must be a positive integer (Megatron-LM's defaults: "
                f"--make-vocab-size-divisible-by 128, --megatron-tp 1)"
            )
    return spec, (args.make_vocab_size_divisible_by or 1) * (args.megatron_tp or 1)


# --- verify --------------------------------------------------------------------------------------


@dataclass
class Stored:
    """The tensors a checkpoint stores in its own format: canonical key -> (stored key, shape, boxes), and a reader."""

    tensors: dict[str, tuple[str, tuple[int, ...], list]]
    read: Callable[[str, tuple], torch.Tensor]


def stored_tensors(fmt: str, path: Path, config: ModelConfig | None) -> Stored:
    """Every model tensor of a checkpoint by its own key names, with the boxes it was stored in."""
    from mixtral.checkpoint import megatron, native

    if fmt == "hf":
        stored = hf.HFSource(path).stored

        def read_hf(key: str, box: tuple) -> torch.Tensor:
            with hf.open_safetensors(stored[key][0]) as handle:
                return handle.get_slice(key)[tuple(slice(o, o + s) for o, s in zip(*box))]

        return Stored({key: (key, shape, [native.whole(shape)]) for key, (_, shape) in stored.items()}, read_hf)
    if fmt == "native":
        source = native.NativeSource(path)
        keys = {f"model.{name}": f"model.{name}" for name in source.shapes}
        metadata, location = source.metadata, source.path
    else:
        source = megatron.MegatronSource(path, config)
        keys, metadata, location = source.keys, source.metadata, source.path
    tensors = {}
    for canonical, key in keys.items():
        md = metadata.state_dict_metadata[key]
        tensors[canonical] = (key, tuple(md.size), [(tuple(c.offsets), tuple(c.sizes)) for c in md.chunks])
    return Stored(tensors, lambda key, box: native.read_boxes(location, {key: [box]}, metadata)[key][0])


def compare_stored(a: Stored, b: Stored, dtype: torch.dtype) -> tuple[int, float, list[str]]:
    """Compare a's tensors (cast to dtype) with b's box by box: (tensors compared, max |diff|, problems)."""
    problems = [f"'{key}' is missing after the round trip" for key in a.tensors if key not in b.tensors]
    problems += [f"'{key}' appears after the round trip" for key in b.tensors if key not in a.tensors]
    worst = 0.0
    count = 0
    for key, (stored_a, _, boxes) in a.tensors.items():
        if key not in b.tensors:
            continue
        stored_b, shape_b, _ = b.tensors[key]
        count += 1
        for offsets, sizes in boxes:
            sizes = tuple(min(s, dim - o) for o, s, dim in zip(offsets, sizes, shape_b))  # padded vocab rows
            if min(sizes, default=1) <= 0:
                continue
            ta, tb = a.read(stored_a, (offsets, sizes)).to(dtype), b.read(stored_b, (offsets, sizes))
            if ta.dtype != tb.dtype or ta.shape != tb.shape:
                problems.append(f"'{key}': {ta.dtype} {list(ta.shape)} became {tb.dtype} {list(tb.shape)}")
                break
            diff = (ta.float() - tb.float()).abs().max().item() if ta.numel() else 0.0
            worst = max(worst, diff)
            if not bool((ta == tb).all()):
                problems.append(f"'{key}' differs at box {offsets} (max |diff| {diff:.3g})")
                break
    return count, worst, problems


def prompt_logits(source: Source, round_to: torch.dtype | None = None) -> torch.Tensor:
    """fp32 logits of a fixed prompt (the same token ids for every model of a given vocabulary)."""
    model = build_model(source, torch.float32, round_to)
    tokens = (torch.arange(PROMPT_LEN) * 7919 + 1) % source.config.vocab_size
    with torch.no_grad():
        return model(tokens[None]).logits[0]


def verify(
    in_fmt: str, in_path: Path, out_fmt: str, out_path: Path, dtype: torch.dtype | None, config: str | None
) -> bool:
    """Round-trip tensor equality and fixed-prompt logits; prints a table and returns whether all passed."""
    in_source = open_source(in_path, config)[1]
    out_source = open_source(out_path)[1]
    out_dtype = dtype or in_source.dtype
    with tempfile.TemporaryDirectory(dir=out_path.parent, prefix=".verify-") as tmp:
        back = Path(tmp) / "roundtrip"
        write(in_fmt, out_source, back, desc=f"verify {out_fmt} -> {in_fmt}")
        count, worst, problems = compare_stored(
            stored_tensors(in_fmt, in_path, in_source.config), stored_tensors(in_fmt, back, in_source.config), out_dtype
        )
    expected = prompt_logits(in_source, round_to=out_dtype)
    got = prompt_logits(out_source)
    logit_diff = (expected - got).abs().max().item()
    tolerance = 1e-6 * max(1.0, expected.abs().max().item())
    logits_ok = logit_diff <= tolerance
    rows = [
        ("check", "compared", "max |diff|", "result"),
        (
            f"tensors, {in_fmt} -> {out_fmt} -> {in_fmt}",
            f"{count} tensors",
            f"{worst:.3g}",
            "ok" if not problems else "MISMATCH",
        ),
        (
            "logits, fixed prompt (fp32)",
            f"{PROMPT_LEN}x{expected.shape[-1]}",
            f"{logit_diff:.3g}",
            "ok" if logits_ok else f"MISMATCH (> {tolerance:.1g})",
        ),
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    for problem in problems[:5]:
        print(f"  {problem}")
    return not problems and logits_ok


def run_gguf(args: argparse.Namespace, src: Path, out: Path) -> int:
    """convert --to gguf: one .gguf file for llama.cpp and ollama (mixtral.checkpoint.gguf_export)."""
    from mixtral.checkpoint.gguf_export import write_gguf
    from mixtral.data.tokenizer import Tokenizer

    if args.verify or any(getattr(args, dim) is not None for dim in ("tp", "pp", "ep")):
        raise MixtralError(
            "--verify and --tp/--pp/--ep do not apply to gguf: llama.cpp reads the file whole "
            "(tests/test_gguf.py checks it against llama.cpp itself)"
        )
    if out.suffix != ".gguf" or out.is_dir():
        raise MixtralError(f"--output {out}: a GGUF output is one file named *.gguf, e.g. --output mixtral.gguf")
    kind = {"fp32": "f32", None: "bf16"}.get(args.dtype, args.dtype)
    source = open_source(src, args.config)[1]
    total = sum(math.prod(shape) for shape in source.shapes.values()) * 2
    with tqdm(total=total, unit="B", unit_scale=True, desc=f"-> gguf {kind}", disable=None, file=sys.stderr) as bar:
        write_gguf(
            out,
            source.config,
            source.read,
            Tokenizer(resolve_checkpoint(src)).path,
            kind,
            name=Path(args.input).name,
            on_write=bar.update,
        )
    print(f"wrote {out} (GGUF {kind.upper()}); llama.cpp: llama-cli -m {out}; ollama: a Modelfile with `FROM {out}`")
    return 0


def run(args: argparse.Namespace) -> int:
    if args.dtype is not None and args.dtype not in DTYPE_NAMES:
        raise MixtralError(f"--dtype {args.dtype!r} is not one convert writes; choose one of {', '.join(DTYPE_NAMES)}")
    if args.dtype == "q8_0" and args.to != "gguf":
        raise MixtralError("--dtype q8_0 is a GGUF type; use --to gguf, or bf16 / fp32 for the other formats")
    if args.dtype == "int8" and (args.to != "native" or args.verify):
        raise MixtralError(
            "--dtype int8 (int8 weights with per-channel scales, for generate / serve --dtype int8) is written as a "
            "native checkpoint: use --to native (without --verify: int8 does not round-trip exactly)"
        )
    given = local_checkpoint(args.input)  # a Hub model ID: its cached snapshot
    src, out = resolve_checkpoint(given), Path(args.output)  # a run or checkpoints root: its latest step
    spec, vocab_multiple = megatron_target(args)
    if args.to == "gguf":
        return run_gguf(args, src, out)
    a, b = src.resolve(), out.resolve()
    if a == b or a in b.parents or b in a.parents:
        raise MixtralError(f"--output {out} overlaps --input {src}; write the conversion to a separate directory")
    in_fmt, source = open_source(src, args.config)
    if any(name.endswith("_scale") for name in source.shapes):
        raise MixtralError(
            f"{src} holds int8 weights (convert --dtype int8): generate and serve load it directly; convert from the "
            f"float checkpoint it was made from"
        )
    layout = target_layout(args, source.config)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32, "int8": torch.bfloat16}.get(args.dtype)
    write(
        args.to,
        source,
        out,
        dtype,
        layout,
        extra={"converted_from": in_fmt},
        desc=f"{in_fmt} -> {args.to}",
        megatron_spec=spec,
        vocab_multiple=vocab_multiple,
        int8=args.dtype == "int8",
    )
    copied = copy_tokenizer_files([given, src], out)
    shown = f", layout {layout}" if layout else ""
    stored = "int8 weights" if args.dtype == "int8" else str(dtype or source.dtype).removeprefix("torch.")
    print(f"wrote {args.to} checkpoint {out} ({stored}{shown})" + (f" with {', '.join(copied)}" if copied else ""))
    if args.verify and not verify(in_fmt, src, args.to, out, dtype, args.config):
        print("verify: the output does not reproduce the input", file=sys.stderr)
        return 1
    return 0
