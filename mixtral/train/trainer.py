"""The training loop: micro-batches, grad clip, AdamW, schedule, eval, NaN skipping, checkpoints and metrics.

On many ranks (torchrun, or `mixtral-run train --nproc-per-node N`) the recipe's parallel section lays the model
out through mixtral.parallel.parallelize; every rank runs this loop, rank 0 alone logs and prints.
Precision: fp32; bf16 (autocast over fp32 parameters); bf16_master (bf16 parameters and gradients, fp32 master
weights and gradient accumulation in the optimizer, as Megatron's mixed precision).
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from mixtral.backend import get_backend
from mixtral.build import build_for_training, materialize
from mixtral.data.loader import Loader, SampleSource, build_datasets
from mixtral.data.tokenizer import default_tokenizer_path, load_tokenizer
from mixtral.errors import MixtralError
from mixtral.model.moe import moe_step_end, routing_summary
from mixtral.parallel import (
    ParallelDims,
    Pipeline,
    clip_grad_norm_,
    expert_checkpoint_views,
    expert_parameters,
    mean_over,
    microbatch_sync,
    shard_sequence,
)
from mixtral.parallel.spmd import spmd_layout
from mixtral.planner import Device, Workload, backend_device, check_memory, get_device, stage_memory
from mixtral.recipes import Recipe
from mixtral.train import checkpointing as ckpt
from mixtral.train.loss import TrainingLoss
from mixtral.train.memory import ROWS, step_bytes
from mixtral.train.metrics import (
    MetricsLog,
    expert_load,
    measure_peak_flops,
    truncate_after,
)
from mixtral.train.optim import build_optimizer, lr_factor, set_lr


@dataclass
class StepStats:
    loss: float
    ce_loss: float
    aux_loss: float
    grad_norm: float
    tokens_per_expert: torch.Tensor  # [layers, experts], summed over the step's micro-batches
    routing: dict[str, list] = field(default_factory=dict)  # per layer: dropped_fraction, capacity_bin
    memory: dict[str, list] = field(default_factory=dict)  # first step: bytes per rank, mixtral.train.memory
    bin_edges: dict[str, list] = field(default_factory=dict)  # capacity_bin_edges when the bins were (re)made

    @property
    def finite(self) -> bool:
        return math.isfinite(self.loss) and math.isfinite(self.grad_norm)


class Trainer:
    def __init__(self, recipe: Recipe, data: tuple[SampleSource, SampleSource] | None = None) -> None:
        """Build model, optimizer and data; data overrides the recipe's corpus (tests, custom sources)."""
        r = self.recipe = recipe
        p = r.parallel
        self.backend = get_backend(r.backend).configure(r.backend_options)
        self.spmd = self.backend.capabilities.spmd and p.world_size > 1  # one process drives every device
        if self.spmd and (p.pp > 1 or p.cp > 1):
            raise MixtralError(
                f"the {self.backend.name} backend runs parallel.dp, tp and ep as one SPMD program; "
                f"pipeline and context parallelism are not supported there: set parallel.pp=1 cp=1"
            )
        # the MLPerf mesh: batch over fsdp x expert, experts over expert, Megatron TP over tensor
        self.spmd_mesh = (
            {"fsdp": p.dp // p.ep, "tensor": p.tp, **({"expert": p.ep} if p.ep > 1 else {})} if self.spmd else None
        )
        if not dist.is_initialized() and p.world_size > 1 and not self.spmd:
            raise MixtralError(
                f"this recipe's layout needs {p.world_size} ranks (parallel.dp x tp x pp x cp); launch "
                f"it with `mixtral-run train --recipe ... --nproc-per-node {p.world_size}` or torchrun"
            )
        world = dist.get_world_size() if dist.is_initialized() else p.world_size if self.spmd else 1
        self.dims = ParallelDims(p.dp, p.tp, p.pp, p.cp, p.ep, p.etp, p.sp, world_size=world)
        self.is_main = not dist.is_initialized() or dist.get_rank() == 0  # logs, prints and writes run files
        self.device = self.backend.device(int(os.environ.get("LOCAL_RANK", "0")))
        self.config = r.model_config()
        if r.seq_len > self.config.max_position_embeddings:
            raise MixtralError(
                f"seq_len {r.seq_len} exceeds the model's max_position_embeddings "
                f"{self.config.max_position_embeddings}; lower seq_len or raise "
                f"model.max_position_embeddings"
            )
        self.dims.validate_model(self.config, r.seq_len)
        self.workload, self.planned_device = Workload.from_recipe(r), self._planned_device()
        if self.planned_device is not None:  # refuse a layout that cannot fit before allocating anything
            check_memory(self.config, self.workload, self.planned_device, f"recipe {r.name}")
        self.meshes = self.dims.build_meshes(self.device.type) if dist.is_initialized() and not self.spmd else None
        torch.manual_seed(r.train.seed)
        random.seed(r.train.seed)
        group = self.meshes.dp_cp.get_group() if self.meshes is not None else None
        self.loss = TrainingLoss(
            self.config, r.moe, group, self.backend.ops.cross_entropy
        )  # each rank's share of the data x context ranks' batch
        self.model, self.pipeline = self._build_model()
        self.checkpoint_views = expert_checkpoint_views(self.meshes) if self.meshes else None
        named = list(self.model.named_parameters())
        experts = {id(q) for q in expert_parameters(self.model)} if self.meshes and self.meshes.expert else set()
        self.is_expert = [id(param) in experts for _, param in named]  # shards over ep / etp: their norm sums there
        self.masters: list[torch.Tensor] = []
        if r.precision == "bf16_master":
            self.masters = [torch.nn.Parameter(p.detach().float().clone()) for _, p in named]
            named = [(n, m) for (n, _), m in zip(named, self.masters)]
        self.optimizer = build_optimizer(named, r.optimizer)
        train, self.valid = data if data is not None else self._build_data()
        if self.spmd:  # every data-parallel micro-batch in one tensor, split over the devices by its sharding
            self.loader = Loader(train, r.batch.micro_batch * self.dims.dp, r.train.seed, 0, 1)
        else:
            dp_rank = self.meshes["dp"].get_local_rank() if self.meshes else 0
            self.loader = Loader(train, r.batch.micro_batch, r.train.seed, dp_rank, self.dims.dp)
        self.step, self.tokens, self.skipped, self.bad_in_a_row = 0, 0, 0, 0
        self.logged_edges: list[list[int]] | None = None  # the capacity bins last written to metrics.jsonl

    def _build_model(self) -> tuple[torch.nn.Module, Pipeline | None]:
        """This rank's part of the model (its pipeline stage under pp), laid out on the meta device, then only that
        part materialised on this device and filled: from model.init_from, or the seed's layout-independent init."""
        r = self.recipe
        layout = spmd_layout(self.spmd_mesh) if self.spmd_mesh else None
        model, parts = build_for_training(
            r, self.backend, self.dims, self.meshes, self.device, loss=self.loss, layout=layout
        )
        init = dict(seed=r.train.seed, init_from=r.model.init_from)
        if self.spmd_mesh:
            materialize(model, model, self.device, **init)  # lazy XLA tensors, sharded by parallelize below
            return self.backend.parallelize(model.train(), self.spmd_mesh), None
        materialize(model, parts.model, self.device, self.meshes, **init)
        parts.model.train()
        return parts.model, parts.pipeline

    def _peak_flops(self) -> float:
        """MFU's denominator: the backend's datasheet peak for this device and precision, else measured here."""
        dtype = torch.float32 if self.recipe.precision == "fp32" else torch.bfloat16
        return self.backend.peak_flops(self.device, dtype) or measure_peak_flops(
            self.device, dtype, self.backend.synchronize
        )

    def _checked_peak(self, peak: float, achieved: float) -> float:
        """peak, unless this step beat it (an MFU above 1: the denominator is wrong): then measured again, and said."""
        if achieved <= peak:
            return peak
        given = "train.peak_flops" if self.recipe.train.peak_flops else "the peak FLOP/s"
        fixed = max(self._peak_flops(), achieved)
        tqdm.write(
            f"step {self.step}: {achieved / 1e12:.3g} TFLOP/s beats {given} {peak / 1e12:.3g} (MFU would be "
            f"{achieved / peak:.2f}); measured again: {fixed / 1e12:.3g} TFLOP/s from here on"
            + (" (set train.peak_flops to the device's datasheet figure)" if self.recipe.train.peak_flops else "")
        )
        return fixed

    def _planned_device(self) -> Device | None:
        """The planner's device this run is checked against: hardware.device, else the backend's (None: unknown)."""
        name = self.recipe.hardware.device or backend_device(self.backend.name)
        return get_device(name) if name else None

    def _memory_record(self, optimizer_stepped: bool) -> dict:
        """Every rank's weight, gradient and optimizer-state bytes during a step (the planner's rows, from the
        real tensors: mixtral.train.memory.step_bytes) next to the planner's for that rank's stage; call on every
        rank after the first step's backward. Warns (rank 0) where they differ by more than 10%."""
        if self.spmd or self.planned_device is None or not optimizer_stepped:
            return {}
        mine = step_bytes(list(self.model.parameters()), self.masters, self.optimizer, self.recipe.parallel.zero)
        stage = self.meshes["pp"].get_local_rank() if self.meshes else 0
        rows = dict(stage_memory(self.config, self.workload, self.planned_device, stage).rows)
        row = torch.tensor([*(mine[name] for name in ROWS), sum(rows[name] for name in ROWS)], dtype=torch.float64)
        if dist.is_initialized():
            everyone = [torch.zeros_like(row) for _ in range(dist.get_world_size())]
            dist.all_gather(everyone, row)
            row = torch.stack(everyone)
        table = row.view(-1, 4).tolist()
        record = {
            key: [round(r[i]) for r in table]
            for i, key in enumerate(("param_bytes", "grad_bytes", "optim_bytes", "planned_bytes"))
        }
        for rank, (*held, planned) in enumerate(table):
            if self.is_main and abs(sum(held) - planned) > 0.1 * planned:
                tqdm.write(
                    f"warning: rank {rank} holds {sum(held) / 2**20:.1f} MiB of weights, gradients and "
                    f"optimizer states, the planner expects {planned / 2**20:.1f} MiB (more than 10% apart): "
                    f"`mixtral-run recipe validate {self.recipe.name} --dry-run` compares them row by row"
                )
        return record

    def _build_data(self) -> tuple[SampleSource, SampleSource]:
        r = self.recipe
        tokenizer = load_tokenizer(r.data.tokenizer)
        if tokenizer.vocab_size > self.config.vocab_size:
            raise MixtralError(
                f"the tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is "
                f"{self.config.vocab_size}; set model.vocab_size={tokenizer.vocab_size}"
            )
        return build_datasets(r.data, r.seq_len, r.train.seed)

    @property
    def run_dir(self) -> Path:
        return self.recipe.output_dir

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.recipe.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def parameters(self) -> list[torch.Tensor]:
        """What the optimizer updates: the fp32 masters under bf16_master, else the model's parameters."""
        return self.masters or list(self.model.parameters())

    def train_step(self, batches: list[torch.Tensor]) -> StepStats:
        """Forward and backward over the micro-batches, then clip and AdamW unless the loss or a gradient is not
        finite."""
        self._zero_grad()
        if self.pipeline is not None:  # the pipeline's micro-batches are the step's micro-batches
            tokens, targets = self._inputs(torch.cat(batches))
            with self.autocast():
                losses, stage_routing = self.pipeline.step(tokens, targets)
            totals = losses.sum(0)
            counts, dropped, bins = self._stage_routing(stage_routing)
            if self.masters:
                self._accumulate_master_grads(first=True)
        else:
            totals, counts, dropped = torch.zeros(3, device=self.device), 0, 0
            for i, batch in enumerate(batches):
                tokens, targets = self._inputs(batch)
                with self.autocast():
                    out = self.loss.of(self.model, tokens, targets, keep_logits=False)
                microbatch_sync(self.model, self.recipe.parallel.zero, last=i == len(batches) - 1)
                (out.loss / len(batches)).backward()
                totals += torch.stack([out.loss.detach(), out.ce_loss.detach(), out.aux_loss.detach()]).float()
                layer_counts, layer_dropped, bins = routing_summary(out.routing)
                counts, dropped = counts + layer_counts, dropped + layer_dropped
                if self.masters:
                    self._accumulate_master_grads(first=i == 0)
        params = self.parameters()
        dense = [q for q, expert in zip(params, self.is_expert) if not expert]
        experts = [q for q, expert in zip(params, self.is_expert) if expert]
        grad_norm = clip_grad_norm_(dense, experts, self.recipe.optimizer.grad_clip or float("inf"), self.meshes)
        loss, ce_loss, aux_loss = self._data_mean(totals / len(batches)).tolist()
        stats = StepStats(loss, ce_loss, aux_loss, grad_norm.item(), self._data_sum(counts).cpu())
        pairs = stats.tokens_per_expert.sum(1).clamp_min(1)
        stats.routing = {
            "dropped_fraction": [round(x, 5) for x in (self._data_sum(dropped).cpu() / pairs).tolist()],
            "capacity_bin": bins.tolist(),
        }
        if stats.finite:
            self.optimizer.step()
            if self.masters:
                with torch.no_grad():
                    for param, master in zip(self.model.parameters(), self.masters):
                        param.copy_(master)
        if stats.finite:
            stats.bin_edges, bias = self._routing_step_end()
            stats.routing.update(bias)
        if self.step == 0:
            stats.memory = self._memory_record(stats.finite)
        self._zero_grad()
        return stats

    def _stage_layers(self) -> list[tuple[int, torch.nn.Module]]:
        """(model layer index, block) of the blocks this rank holds (its pipeline stage's)."""
        layers = self.model.layers
        return [(int(i), layer) for i, layer in layers.items()] if hasattr(layers, "items") else list(enumerate(layers))

    def _routing_step_end(self) -> tuple[dict[str, list], dict[str, list]]:
        """After an optimizer step: expert-bias updates and capacity-bin re-shaping (moe_step_end) from usage summed
        over the data x context ranks, so every rank decides alike. Returns what the step's metrics carry: every
        layer's capacity_bin_edges on the first step and on steps that changed them, and (on expert-load steps)
        every layer's expert_bias."""
        moe = self.recipe.moe
        if moe.dispatcher != "capacity_bins" and not moe.expert_bias:
            return {}, {}
        layers = self._stage_layers()
        moe_step_end([layer.mlp for _, layer in layers], self._data_sum, layers[0][0])
        every = self.recipe.train.expert_load_interval
        interval = moe.capacity_bins.optimize_interval if moe.capacity_bins else 0
        edges, bias = {}, {}
        if moe.dispatcher == "capacity_bins" and (self.step == 0 or (interval and (self.step + 1) % interval == 0)):
            table = self._all_layers(layers, lambda layer: layer.mlp.dispatcher.bins.edges)
            if table != self.logged_edges:
                edges["capacity_bin_edges"] = self.logged_edges = table
        if moe.expert_bias and every and (self.step + 1) % every == 0:
            table = self._all_layers(layers, lambda layer: layer.mlp.expert_bias.float())
            bias["expert_bias"] = [[round(b, 6) for b in row] for row in table]
        return edges, bias

    def _all_layers(self, layers: list[tuple[int, torch.nn.Module]], value) -> list[list]:
        """value(block) of every layer of the model, [layers][...], from the pipeline stages that hold them."""
        rows = {i: value(layer) for i, layer in layers}
        width = next(iter(rows.values())).numel()
        table = torch.zeros(self.config.num_hidden_layers, width, dtype=torch.float64, device=self.device)
        for i, row in rows.items():
            table[i] = row.to(torch.float64)
        if self.meshes is not None and self.meshes["pp"].size() > 1:
            dist.all_reduce(table, op=dist.ReduceOp.SUM, group=self.meshes["pp"].get_group())
        as_int = all(not torch.is_floating_point(row) for row in rows.values())
        return [[int(x) for x in row] if as_int else row for row in table.tolist()]

    def _zero_grad(self) -> None:
        """Drop the gradients, but keep the fp32 master gradients' buffers: the next step writes into them
        (_accumulate_master_grads) rather than allocating them anew."""
        if not self.masters:
            self.optimizer.zero_grad(set_to_none=True)
        self.model.zero_grad(set_to_none=True)

    def _inputs(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens and targets of samples [B, S + 1] on this device; under context parallelism this rank's chunk."""
        batch = batch.to(self.device, non_blocking=True)
        tokens, targets = batch[:, :-1], batch[:, 1:]
        if self.dims.cp > 1:
            tokens, targets = shard_sequence(tokens, self.meshes["cp"]), shard_sequence(targets, self.meshes["cp"])
        return tokens, targets

    def _data_mean(self, value: torch.Tensor) -> torch.Tensor:
        """A loss over the data x context ranks: each rank's is its share (TrainingLoss), their mean the whole."""
        return mean_over(value, self.meshes.dp_cp) if self.meshes else value

    def _data_sum(self, counts: torch.Tensor) -> torch.Tensor:
        """Tokens per expert [layers, experts] over the data x context ranks' batches."""
        if self.meshes is None or self.meshes.dp_cp.size() == 1:
            return counts
        counts = counts.clone()
        dist.all_reduce(counts, op=dist.ReduceOp.SUM, group=self.meshes.dp_cp.get_group())
        return counts

    def _stage_routing(self, per_microbatch: list[list]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Every layer's (tokens per expert, dropped pairs, bin) from the pipeline stage that holds it: counts summed
        over the micro-batches, the bin of the last one."""
        summaries = [routing_summary(routing) for routing in per_microbatch]
        held = [sum(s[0] for s in summaries), sum(s[1] for s in summaries), summaries[-1][2]]
        layers = [int(i) for i in self.model.layers.keys()]
        out = []
        for tensor in held:  # zeros for the other stages' layers, then summed over the stages
            whole = torch.zeros(self.config.num_hidden_layers, *tensor.shape[1:], dtype=torch.int64, device=self.device)
            whole[layers] = tensor.to(torch.int64)
            dist.all_reduce(whole, op=dist.ReduceOp.SUM, group=self.meshes["pp"].get_group())
            out.append(whole)
        return out[0], out[1], out[2]

    def _accumulate_master_grads(self, first: bool) -> None:
        """Move the bf16 micro-batch gradients into the fp32 master gradients (accumulation in fp32); the first
        micro-batch of a step overwrites the previous step's: on the CPU a fresh fp32 copy of every gradient is
        page-faulted in again each step (bench/RESULTS.md)."""
        for param, master in zip(self.model.parameters(), self.masters):
            if param.grad is None:
                if first:
                    master.grad = None
            elif master.grad is None:
                master.grad = param.grad.float()
            elif first:
                master.grad.copy_(param.grad)
            else:
                master.grad.add_(param.grad)
            param.grad = None

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean cross-entropy over the first eval.samples validation sequences (every data rank evaluates them all)."""
        r = self.recipe
        n = min(r.eval.samples, len(self.valid))
        self.model.eval()
        total = 0.0
        for start in range(0, n, r.batch.micro_batch):
            batch = torch.stack([self.valid[i] for i in range(start, min(start + r.batch.micro_batch, n))])
            tokens, targets = self._inputs(batch)
            with self.autocast():
                if self.pipeline is not None:
                    ce_loss = self.pipeline.cross_entropy(tokens, targets)
                else:
                    ce_loss = self.loss.of(self.model, tokens, targets).ce_loss
            total += self._data_mean(ce_loss.float()).item() * batch.shape[0]
        self.model.train()
        return total / n

    def state_dict(self) -> dict:
        """The loop's own state (JSON, in the checkpoint's manifest); the schedule is a function of the step."""
        return {"step": self.step, "tokens": self.tokens, "skipped": self.skipped, "loader": self.loader.state_dict()}

    def save(self) -> Path:
        """Publish a native checkpoint of this step: model, optimizer (sharded as they are), state, RNG."""
        r = self.recipe
        layout = {d: getattr(r.parallel, d) for d in ("dp", "tp", "pp", "cp", "ep")}
        module = ckpt.optimized_module(self.model, self.masters)
        return ckpt.save_training_checkpoint(
            r.checkpoint_dir,
            self.step,
            module,
            self.optimizer,
            self.config,
            self.state_dict(),
            r.checkpoint.keep_last,
            layout,
            r.data.tokenizer or default_tokenizer_path(),
            self.device.type,
            self.checkpoint_views,
        )

    def restore(self) -> Path:
        """Continue from `latest`: weights, optimizer, data position, RNG states and the step."""
        step_dir = ckpt.latest_step_dir(self.recipe.checkpoint_dir)
        if step_dir is None:
            raise MixtralError(
                f"--resume: no complete checkpoint in {self.recipe.checkpoint_dir} (no "
                f"{ckpt.LATEST}/manifest.json); start the run without --resume"
            )
        module = ckpt.optimized_module(self.model, self.masters)
        state = ckpt.load_training_checkpoint(step_dir, module, self.optimizer, self.device.type, self.checkpoint_views)
        with torch.no_grad():
            for param, master in zip(self.model.parameters(), self.masters):
                param.copy_(master)
        self.loader.load_state_dict(state["loader"])
        self.step, self.tokens, self.skipped = state["step"], state["tokens"], state["skipped"]
        return step_dir

    def _eval_due(self, tokens_before: int) -> bool:
        e = self.recipe.eval
        if e.interval == 0:
            return False
        if self.step == self.recipe.train.steps:
            return True
        if e.unit == "tokens":
            return self.tokens // e.interval > tokens_before // e.interval
        return self.step % e.interval == 0

    def _write_recipe(self) -> None:
        path = self.run_dir / "recipe.yaml"
        tmp = path.with_name(f".recipe.yaml.tmp-{os.getpid()}")
        tmp.write_text(self.recipe.to_yaml())
        os.replace(tmp, path)

    def fit(self, resume: bool = False) -> dict:
        """Train to train.steps (or eval.target_loss); returns the last train and eval metrics."""
        r = self.recipe
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            ckpt.remove_stale_temporaries(r.checkpoint_dir)
        if resume:
            self.restore()
        peak = float("nan")  # MFU is rank 0's to log; measuring on every rank at once would share the device
        log = None
        if self.is_main:
            truncate_after(self.run_dir, self.step)
            self._write_recipe()
            peak = r.train.peak_flops or self._peak_flops()
            log = MetricsLog(self.run_dir, r.train.tensorboard)
        flops_per_token = self.config.flops_per_token(r.seq_len)
        tokens_per_step = r.batch.global_batch * r.seq_len
        bar = tqdm(
            total=r.train.steps,
            initial=self.step,
            desc=f"train {r.name}",
            unit="step",
            dynamic_ncols=True,
            disable=not self.is_main,
        )
        summary: dict = {"step": self.step}
        if r.eval.at_start and r.eval.interval and self.step == 0:
            summary["eval_loss"] = self._log_eval(log)
        try:
            while self.step < r.train.steps:
                start = time.perf_counter()
                lr = r.optimizer.lr * lr_factor(r.schedule, self.step, r.train.steps)
                set_lr(self.optimizer, lr)
                stats = self.train_step([next(self.loader) for _ in range(r.grad_accum)])
                self.backend.mark_step()
                tokens_before = self.tokens
                self.step += 1
                self.tokens += tokens_per_step
                tokens_per_s = tokens_per_step / (time.perf_counter() - start)
                if not stats.finite:
                    self._bad_step(stats, log)
                    continue
                self.bad_in_a_row = 0
                record = {
                    "step": self.step,
                    "loss": stats.loss,
                    "ce_loss": stats.ce_loss,
                    "aux_loss": stats.aux_loss,
                    "lr": lr,
                    "grad_norm": stats.grad_norm,
                    "tokens_per_s": round(tokens_per_s, 1),
                    "mfu": None,
                    "tokens": self.tokens,
                }
                if self.is_main:
                    peak = self._checked_peak(peak, flops_per_token * tokens_per_s)
                    record["mfu"] = round(flops_per_token * tokens_per_s / peak, 5)
                record.update(stats.memory, **stats.bin_edges)
                every = r.train.expert_load_interval
                if every and self.step % every == 0:
                    record.update(expert_load(stats.tokens_per_expert), **stats.routing)
                if (
                    self.step % r.train.log_interval == 0
                    or self.step == r.train.steps
                    or stats.memory
                    or stats.bin_edges
                ):
                    self._log(log, record)
                summary.update(record)
                bar.update(1)
                bar.set_postfix(loss=f"{stats.loss:.3f}", tok_s=f"{tokens_per_s:.0f}")
                stop = False
                if self._eval_due(tokens_before):
                    summary["eval_loss"] = self._log_eval(log)
                    stop = r.eval.target_loss is not None and summary["eval_loss"] <= r.eval.target_loss
                    if stop and self.is_main:
                        tqdm.write(f"step {self.step}: eval loss reached eval.target_loss {r.eval.target_loss}")
                interval = r.checkpoint.interval
                if stop or self.step == r.train.steps or (interval and self.step % interval == 0):
                    self.save()
                if stop:
                    break
        finally:
            bar.close()
            if log is not None:
                log.close()
        summary["step"] = self.step
        return summary

    @staticmethod
    def _log(log: MetricsLog | None, record: dict) -> None:
        """A metrics line; log is None on every rank but rank 0."""
        if log is not None:
            log.log(record)

    def _log_eval(self, log: MetricsLog | None) -> float:
        eval_loss = self.evaluate()
        self._log(log, {"step": self.step, "eval_loss": eval_loss, "tokens": self.tokens})
        if self.is_main:
            tqdm.write(f"step {self.step}: eval loss {eval_loss:.4f}")
        return eval_loss

    def _bad_step(self, stats: StepStats, log: MetricsLog | None) -> None:
        """A NaN/Inf loss or gradient: no update was made; stop after max_bad_steps in a row."""
        self.skipped += 1
        self.bad_in_a_row += 1
        self._log(
            log,
            {
                "step": self.step,
                "skipped": True,
                "bad_loss": str(stats.loss),
                "bad_grad_norm": str(stats.grad_norm),
                "skipped_steps": self.skipped,
            },
        )
        limit = self.recipe.train.max_bad_steps
        if self.bad_in_a_row >= limit:
            latest = ckpt.latest_step_dir(self.recipe.checkpoint_dir)
            kept = f"the last good checkpoint {latest} is intact" if latest else "no checkpoint was written yet"
            raise MixtralError(
                f"{limit} consecutive steps had a NaN/Inf loss or gradient (last at step {self.step}); "
                f"the run stopped and {kept}: lower optimizer.lr, check the data, then --resume"
            )
