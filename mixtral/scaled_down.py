"""`recipe validate NAME --scaled-down`: the recipe's layout, divided down to a few gloo ranks, against one process.

The layout's dimensions are divided (largest first, by its smallest prime factor; dp before tp, cp, pp on
ties) until at most max_ranks remain: tp8 pp2 cp4 becomes tp2 pp2 cp2. A tiny model shaped so that every
dimension divides it keeps the recipe's MoE settings, checkpointing and ZeRO level; it trains 3 steps in
fp32 on the CPU backend, laid out by mixtral.parallel.parallelize on ranks started by torch's elastic
launcher (torchrun's engine), with the recipe's AdamW at lr 1e-3 (constant). One process then trains the
same model on the same batches, the data ranks' micro-batches concatenated; the losses must agree to
1e-4 relative. Capacity bins shrink to at most 4 bins aligned to 1 row: a tiny batch has too few tokens
per expert for Gaudi's 10 bins aligned to 64.
"""

from __future__ import annotations

import dataclasses
import math
import uuid
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.launcher.api import LaunchConfig, elastic_launch

from mixtral import dry_run
from mixtral.backend import get_backend
from mixtral.build import build_for_training, materialize
from mixtral.errors import MixtralError
from mixtral.model import Mixtral
from mixtral.parallel import (
    ParallelDims,
    clip_grad_norm_,
    expert_parameters,
    init_distributed,
    mean_over,
    microbatch_sync,
)
from mixtral.parallel.context_parallel import shard_sequence
from mixtral.recipes import Recipe, recipe_from_dict
from mixtral.train.loss import TrainingLoss
from mixtral.train.memory import held_bytes
from mixtral.train.optim import build_optimizer

STEPS = 3
RTOL = 1e-4
LR = 1e-3
CUT_ORDER = ("dp", "tp", "cp", "pp")  # on ties, the dimension cut first
MICRO_BATCH = 2


def _smallest_prime_factor(n: int) -> int:
    return next(p for p in range(2, n + 1) if n % p == 0)


def scaled_layout(parallel, max_ranks: int = 8) -> dict[str, Any]:
    """The recipe's parallel section divided down to at most max_ranks ranks; ep and etp follow what is left."""
    if max_ranks < 1:
        raise MixtralError(f"--max-ranks must be at least 1, got {max_ranks}")
    dims = {d: getattr(parallel, d) for d in CUT_ORDER}
    while math.prod(dims.values()) > max_ranks:
        largest = max(CUT_ORDER, key=lambda d: dims[d])
        dims[largest] //= _smallest_prime_factor(dims[largest])
    etp = math.gcd(parallel.etp, dims["tp"])
    ep = math.gcd(parallel.ep, dims["dp"] * dims["cp"] * dims["tp"] // etp)
    return {**dataclasses.asdict(parallel), **dims, "ep": ep, "etp": etp}


def scaled_recipe(recipe: Recipe, max_ranks: int = 8) -> Recipe:
    """The recipe at the scaled layout with a tiny model every dimension divides, fp32, CPU, 3 steps."""
    layout = scaled_layout(recipe.parallel, max_ranks)
    tp, ep, etp, pp, cp = (layout[d] for d in ("tp", "ep", "etp", "pp", "cp"))
    kv_heads = max(2, tp)
    seq_len = 16 * cp * (tp if layout["sp"] else 1)
    accumulate = max(pp, min(2, recipe.grad_accum))  # a pipeline needs a micro-batch per stage in flight
    config = recipe.model_config()
    data = recipe.to_dict()
    data.update(
        model={
            "vocab_size": 128,
            "hidden_size": 16 * kv_heads,
            "num_attention_heads": 2 * kv_heads,
            "num_key_value_heads": kv_heads,
            "intermediate_size": 32 * etp,
            "num_hidden_layers": 2 * pp,
            "num_local_experts": 8 if 8 % ep == 0 else 2 * ep,
            "num_experts_per_tok": config.num_experts_per_tok,
            "max_position_embeddings": seq_len,
            "tie_word_embeddings": config.tie_word_embeddings,
        },
        parallel=layout,
        seq_len=seq_len,
        precision="fp32",
        backend="cpu",
        backend_options={},
        hardware={},
        mode="train",
        batch={"micro_batch": MICRO_BATCH, "global_batch": MICRO_BATCH * layout["dp"] * accumulate},
        optimizer={**data["optimizer"], "lr": LR},
        schedule={"name": "constant"},
        compile=False,
        train={**data["train"], "steps": STEPS, "output_dir": None},
        name=f"{recipe.name}-scaled-down",
    )
    bins = data["moe"]["capacity_bins"]
    if bins:  # a tiny batch has too few tokens per expert for 10 bins aligned to 64 rows
        data["moe"]["capacity_bins"] = {**bins, "num_bins": min(4, bins["num_bins"]), "alignment": 1, "tokens": None}
    return recipe_from_dict(data)


def batches(recipe: Recipe) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens, targets) [steps, global batch, seq_len]: random tokens, the same on every rank."""
    gen = torch.Generator().manual_seed(recipe.train.seed)
    config = recipe.model_config()
    tokens = torch.randint(0, config.vocab_size, (STEPS, recipe.batch.global_batch, recipe.seq_len + 1), generator=gen)
    return tokens[..., :-1], tokens[..., 1:]


def build_model(recipe: Recipe) -> Mixtral:
    """The tiny model in one process, initialised as every layout of the recipe's seed is (mixtral.build)."""
    model, _ = build_for_training(recipe, get_backend("cpu"), None, None, torch.device("cpu"))
    materialize(model, model, "cpu", seed=recipe.train.seed)
    return model


def train(
    recipe: Recipe, step_losses: Callable[[int], torch.Tensor], parameters: list, clip: Callable[[], Any]
) -> tuple[list[torch.Tensor], dict[str, int]]:
    """STEPS AdamW steps; step_losses(step) runs forward and backward and returns the step's loss. Also returns
    the storage the parameters, their gradients and the optimizer states held after the first step."""
    optimizer = build_optimizer(parameters, recipe.optimizer)
    losses, held = [], {}
    for step in range(STEPS):
        losses.append(step_losses(step))
        clip()
        optimizer.step()
        if step == 0:
            held = held_bytes([p for _, p in parameters], [], optimizer)
        optimizer.zero_grad(set_to_none=True)
    return losses, held


def rank_losses(recipe: Recipe) -> tuple[list[float], dict[str, int]]:
    """One rank's part of the scaled-down run (started by the elastic launcher): the data ranks' mean loss per step,
    and what this rank held (train)."""
    torch.set_num_threads(1)
    info = init_distributed("cpu", timeout_s=300.0)
    p = recipe.parallel
    dims = ParallelDims(dp=p.dp, tp=p.tp, pp=p.pp, cp=p.cp, ep=p.ep, etp=p.etp, sp=p.sp, world_size=info.world_size)
    meshes = dims.build_meshes("cpu")
    accumulate = recipe.grad_accum
    loss_fn = TrainingLoss(
        recipe.model_config(), recipe.moe, meshes.dp_cp.get_group(), get_backend("cpu").ops.cross_entropy
    )
    whole, laid = build_for_training(recipe, get_backend("cpu"), dims, meshes, torch.device("cpu"), loss=loss_fn)
    materialize(whole, laid.model, "cpu", meshes, seed=recipe.train.seed)
    model, pipeline = laid.model, laid.pipeline
    tokens, targets = batches(recipe)
    per_rank = MICRO_BATCH * accumulate
    rows = slice(meshes["dp"].get_local_rank() * per_rank, (meshes["dp"].get_local_rank() + 1) * per_rank)

    def step_losses(step: int) -> torch.Tensor:
        x, y = (shard_sequence(t[step, rows], meshes["cp"]) for t in (tokens, targets))
        if pipeline is not None:
            return pipeline.step(x, y)[0][:, 0].mean()
        loss = torch.zeros(())
        for m in range(accumulate):
            micro = slice(m * MICRO_BATCH, (m + 1) * MICRO_BATCH)
            out = loss_fn.of(model, x[micro], y[micro])
            microbatch_sync(model, p.zero, last=m == accumulate - 1)
            (out.loss / accumulate).backward()
            loss += out.loss.detach() / accumulate
        return loss

    experts = expert_parameters(model)
    dense = [param for param in model.parameters() if all(param is not e for e in experts)]
    clip = recipe.optimizer.grad_clip or float("inf")
    try:
        losses, held = train(
            recipe, step_losses, list(model.named_parameters()), lambda: clip_grad_norm_(dense, experts, clip, meshes)
        )
        return [mean_over(loss, meshes.dp_cp).item() for loss in losses], held
    finally:
        dist.destroy_process_group()


def reference_losses(recipe: Recipe) -> list[float]:
    """One process, no torch.distributed: micro-batch m of a step is every data rank's micro-batch m, concatenated."""
    model = build_model(recipe)
    loss_fn = TrainingLoss(recipe.model_config(), recipe.moe, cross_entropy=get_backend("cpu").ops.cross_entropy)
    tokens, targets = batches(recipe)
    accumulate, per_rank = recipe.grad_accum, MICRO_BATCH * recipe.grad_accum

    def step_losses(step: int) -> torch.Tensor:
        loss = torch.zeros(())
        for m in range(accumulate):
            rows = torch.cat(
                [
                    torch.arange(d * per_rank + m * MICRO_BATCH, d * per_rank + (m + 1) * MICRO_BATCH)
                    for d in range(recipe.parallel.dp)
                ]
            )
            out = loss_fn.of(model, tokens[step, rows], targets[step, rows])
            (out.loss / accumulate).backward()
            loss += out.loss.detach() / accumulate
        return loss

    clip = recipe.optimizer.grad_clip or float("inf")
    losses, _ = train(
        recipe,
        step_losses,
        list(model.named_parameters()),
        lambda: torch.nn.utils.clip_grad_norm_(model.parameters(), clip),
    )
    return [loss.item() for loss in losses]


def launch(fn: Callable[..., Any], nprocs: int, *args: Any) -> dict[int, Any]:
    """fn(*args) on nprocs local processes joined by torch's elastic launcher (torchrun --standalone); by rank."""
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nprocs,
        run_id=uuid.uuid4().hex,
        rdzv_backend="c10d",
        rdzv_endpoint="127.0.0.1:0",
        max_restarts=0,
        start_method="spawn",
        monitor_interval=0.1,
    )
    try:
        return elastic_launch(config, fn)(*args)
    except ChildFailedError as exc:
        rank, failure = exc.get_first_failure()
        message = failure.message.get("message", "") if isinstance(failure.message, dict) else str(failure.message)
        raise MixtralError(f"rank {rank} of {nprocs} failed: {message.strip() or failure}") from None


def scaled_down_run(recipe: Recipe, max_ranks: int = 8, out: Callable[[str], Any] = print) -> tuple[list, list]:
    """Train the scaled-down layout on gloo ranks and in one process; MixtralError when the losses differ."""
    small = scaled_recipe(recipe, max_ranks)
    p = small.parallel
    out(
        f"scaled down: {recipe.name} -> dp{p.dp} tp{p.tp} pp{p.pp} cp{p.cp} ep{p.ep} etp{p.etp}"
        f"{' sp' if p.sp else ''} zero{p.zero} on {p.world_size} gloo ranks, {small.model_config().num_parameters:,} "
        f"parameters, {STEPS} steps of {small.batch.global_batch} x {small.seq_len} tokens, fp32"
    )
    try:
        by_rank = launch(rank_losses, p.world_size, small)
    except MixtralError as exc:
        raise MixtralError(
            f"--scaled-down of recipe {recipe.name} at dp{p.dp} tp{p.tp} pp{p.pp} cp{p.cp} ep{p.ep} etp{p.etp}: {exc}"
        ) from None
    ranks = by_rank[0][0]
    one = reference_losses(small)
    for step, (got, want) in enumerate(zip(ranks, one)):
        out(f"  step {step}: loss {got:.6f} on {p.world_size} ranks, {want:.6f} in one process")
    worst = max(abs(a - b) / abs(b) for a, b in zip(ranks, one))
    if worst > RTOL:
        raise MixtralError(
            f"--scaled-down of recipe {recipe.name}: the {p.world_size}-rank loss differs from one "
            f"process by {worst:.2e} relative (> {RTOL:g}); the layout is not equivalent: run "
            f"tests/test_parallel_equivalence.py on these dimensions to find the one at fault"
        )
    out(f"  ok  losses agree to {worst:.1e} relative (<= {RTOL:g})")
    check_held_bytes(small, {rank: held for rank, (_, held) in by_rank.items()}, out)
    return ranks, one


def check_held_bytes(small: Recipe, held: dict[int, dict[str, int]], out: Callable[[str], Any]) -> None:
    """Each rank's weights, gradients and AdamW states after a step equal, to the byte, what the dry run's meta
    build of the same layout says that rank stores (fp32: 4, 4 and 8 bytes per stored element)."""
    built = dry_run.build_ranks(small, sorted(held))
    wrong = []
    for rank, params in zip(sorted(held), built):
        stored = sum(b.local_numel for b in params.values())
        predicted = {"weights": 4 * stored, "gradients": 4 * stored, "optimizer states": 8 * stored}
        if held[rank] != predicted:
            wrong.append(f"rank {rank} held {held[rank]}, the dry run predicts {predicted}")
    if wrong:
        raise MixtralError(
            f"--scaled-down of recipe {small.name}: what the ranks allocated differs from the dry run's "
            f"meta build: {'; '.join(wrong)}"
        )
    total = sum(sum(h.values()) for h in held.values())
    out(
        f"  ok  every rank's weights, gradients and optimizer states ({total:,} bytes in all) are what the dry run "
        f"builds on the meta device"
    )
