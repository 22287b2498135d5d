"""Will a layout fit, and how fast will it run: memory per device, a step-time cost model, a layout search.

Memory per device (bytes) is estimated for every pipeline stage and the busiest stage is reported.
P_d, P_e: the stage's dense parameters (attention, norms, router, embedding on the first stage, lm head
on the last) divided by tp, and its expert parameters divided by ep x etp. Dense ones are replicated over
the dp x cp ranks, experts over edp = dp x cp x tp / (ep x etp) ranks: those are the groups ZeRO shards over.
  training   bytes per parameter  weights / gradients / optimizer (AdamW m, v and, under bf16_master,
             the fp32 master copy):  fp32 and bf16 (autocast over fp32 parameters) 4 / 4 / 8,
             bf16_master 2 / 4 / 12 (Megatron --bf16: fp32 main grads and master weights).
             zero >= 1 divides the optimizer row by the group size (the distributed optimizer), zero >= 2
             also the gradients, zero 3 also the weights, plus a working set of two gathered layers'
             weights and one layer's gradients.
  inference  weights only, 4 bytes (fp32) or 2 (bf16), plus the KV cache:
             2 (k, v) x layers per stage x max(1, kv heads / tp) x head_dim x seq_len x micro_batch x 2 bytes.
Activations, a = 2 bytes (4 under fp32), per micro-batch, per layer, with T = micro_batch x seq_len / cp
tokens per rank, t = T / tp under sequence parallelism (else T), t_moe = min(T, t x etp) tokens entering
the rank's experts and r = top_k x t_moe x pad expert rows (pad: 1 dropless, the capacity factor, 1.5 for
capacity bins, the typical bin above the balanced load):
  attention  a x (2 h t + T (2 n_heads + 2 n_kv) head_dim / tp)    norm in/out; q, k, v, output (flash: no T^2)
             + a x (cp - 1) T 2 n_kv head_dim / tp under cp_algo allgather (the other chunks' K and V, kept)
  moe        a x (2 h t + r (2 h + 3 F / etp)) + 8 t_moe E          norm in/out; expert in, gate_up, swiglu, out; router
  input      a x h t                                                the residual stream kept by checkpointing
  none: attention + moe per layer; full: input per layer plus one layer recomputed (attention + moe);
  selective (every other block, as the trainer does): half the layers full, half input only, plus one layer;
  moe (Gaudi --moe-layer-recompute): attention + input per layer plus one moe block recomputed.
  Stage i of a 1F1B pipeline holds min(pp - i, micro-batches) micro-batches in flight; the last stage adds
  the logits T x vocab / tp x (a + 4) (fp32 for the cross-entropy).
A reserve of 8% of the device's memory stands for the runtime context, communication buffers and
allocator slack.

Step time (training) = compute + tp + cp + ep + pp + dp, nothing overlapped (an upper bound):
  compute    FLOPs per device (ModelConfig.flops_per_token, expert FLOPs times pad, plus one more forward
             for what checkpointing recomputes) / (peak x mfu)
  tp         4 collectives (all-gather / reduce-scatter, forward and backward) per layer per micro-batch for
             attention, 4 more for experts when etp > 1, each (tp - 1) / tp x T h a bytes
  cp         per layer per micro-batch, passes of (cp - 1) x T x 2 n_kv head_dim x a bytes: ring attention 3
             (forward k, v; backward k, v and their gradients), allgather 2 (all-gather k, v; reduce-scatter
             their gradients)
  ep         4 all-to-alls per layer per micro-batch of top_k x t x h x a x pad x (ep - 1) / ep bytes
             (allgather dispatcher: all-gather then reduce-scatter of (ep x etp - 1) x t x h x a bytes)
  pp         bubble (compute + tp + cp + ep) x (pp - 1) / m (idle share (pp - 1) / (m + pp - 1) of the step)
             plus 2 point-to-point activation sends per micro-batch
  dp         per group of g ranks, (g - 1) / g of: zero 0 an all-reduce of the gradients (2x), zero 1 a
             reduce-scatter of gradients and an all-gather of weights once per step, zero 2 the reduce-scatter
             every micro-batch, zero 3 also two weight all-gathers per micro-batch
A group's bandwidth is the device's intra-node figure when its ranks lie inside one link domain (ranks
are laid out (pp, dp, cp, tp), tp innermost, experts (pp, edp, ep, etp)), else the inter-node figure.
Each backend declares the devices it drives (Backend.planner_devices), with every figure these use.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass
from typing import Any

from mixtral.backend import Device
from mixtral.config import CP_ALGOS, EP_COMMS, ModelConfig, divisors
from mixtral.errors import MixtralError

GiB = 2**30
RESERVE = 0.08  # share of device memory kept for the runtime, communication buffers, fragmentation
BINS_PAD = 1.5  # capacity bins: expected expert-input padding (the bin above the balanced load)
CHECKPOINTING = ("none", "selective", "moe", "full")
MODES = ("train", "inference")


def devices() -> dict[str, Device]:
    """Every device a registered backend declares (Backend.planner_devices), by name."""
    from mixtral.backend import all_backends

    return {device.name: device for backend in all_backends() for device in backend.planner_devices}


def backend_device(backend: str) -> str | None:
    """The default device of a backend (its first planner device), None for a backend that declares none."""
    return next((d.name for d in devices().values() if d.backend == backend), None)


def get_device(name: str) -> Device:
    known = devices()
    if name not in known:
        raise MixtralError(f"unknown device type '{name}'; choose one of: {', '.join(known)}")
    return known[name]


@dataclass(frozen=True)
class Workload:
    """Everything the estimates need besides the model and the device: the layout and the batch."""

    dp: int = 1
    tp: int = 1
    pp: int = 1
    cp: int = 1
    ep: int = 1
    etp: int = 1
    sp: bool = False
    zero: int = 1
    micro_batch: int = 1
    global_batch: int = 1
    seq_len: int = 2048
    precision: str = "bf16_master"
    checkpointing: str = "none"
    dispatcher: str = "dropless"
    capacity_factor: float | None = None
    ep_comm: str = "alltoall"
    cp_algo: str = "allgather"
    mode: str = "train"

    @property
    def world_size(self) -> int:
        return self.dp * self.tp * self.pp * self.cp

    @property
    def edp(self) -> int:
        return self.dp * self.cp * self.tp // (self.ep * self.etp)

    @property
    def micro_batches(self) -> int:
        """Micro-batches per step on each rank (1 for inference)."""
        return max(1, self.global_batch // (self.micro_batch * self.dp)) if self.mode == "train" else 1

    @property
    def pad(self) -> float:
        """Expert rows per routed token pair: padding to capacity or to a bin."""
        return {"capacity": self.capacity_factor or 1.0, "capacity_bins": BINS_PAD}.get(self.dispatcher, 1.0)

    @property
    def layout(self) -> str:
        dims = "".join(f"{d}{getattr(self, d)}" for d in ("dp", "tp", "pp", "cp", "ep", "etp"))
        return dims + ("+sp" if self.sp and self.tp > 1 else "")

    def replace(self, **changes: Any) -> Workload:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_recipe(cls, recipe) -> Workload:
        """The layout, batch, precision, checkpointing, dispatcher and mode of a mixtral.recipes.Recipe."""
        p, moe = recipe.parallel, recipe.moe
        return cls(
            dp=p.dp,
            tp=p.tp,
            pp=p.pp,
            cp=p.cp,
            ep=p.ep,
            etp=p.etp,
            sp=p.sp,
            zero=p.zero,
            micro_batch=recipe.batch.micro_batch,
            global_batch=recipe.batch.global_batch,
            seq_len=recipe.seq_len,
            precision=recipe.precision,
            checkpointing=recipe.activation_checkpointing,
            dispatcher=moe.dispatcher,
            capacity_factor=moe.capacity_factor,
            ep_comm=moe.ep_comm,
            cp_algo=p.cp_algo,
            mode=recipe.mode,
        )


def recipe_device(recipe, override: str | None = None) -> Device:
    """The device a recipe is checked against: --device-type, else hardware.device, else its backend's."""
    name = override or recipe.hardware.device or backend_device(recipe.backend)
    if name is None:
        raise MixtralError(
            f"recipe '{recipe.name}' has backend '{recipe.backend}', which names no device; set "
            f"hardware.device ({', '.join(devices())}) or pass --device-type"
        )
    return get_device(name)


# ----------------------------------------------------------------------------------------------- memory


@dataclass(frozen=True)
class MemoryEstimate:
    device: Device
    stage: int  # the busiest pipeline stage
    rows: tuple[tuple[str, float], ...]  # (what, bytes) for that stage, reserve included

    @property
    def total(self) -> float:
        return sum(b for _, b in self.rows)

    @property
    def capacity(self) -> float:
        return self.device.memory_gib * GiB

    @property
    def fits(self) -> bool:
        return self.total <= self.capacity

    def table(self) -> str:
        lines = [f"memory per device, pipeline stage {self.stage} (the busiest), on {self.device.label}:"]
        lines += [f"  {what:<30} {b / GiB:9.2f} GiB" for what, b in self.rows]
        verdict = "fits" if self.fits else "DOES NOT FIT"
        lines.append(f"  {'total':<30} {self.total / GiB:9.2f} GiB of {self.device.memory_gib:g} GiB: {verdict}")
        return "\n".join(lines)


def shard_shapes(config: ModelConfig, w: Workload, stage: int) -> dict[str, tuple[int, ...]]:
    """Each parameter one rank of the pipeline stage holds, by its Mixtral name, with its local shape.

    tp splits attention heads (q, k, v rows; o columns) and the vocabulary (embedding, lm head), ep the
    experts and etp each expert's intermediate size; norms and the router are whole. The stage holds
    layers [stage x L / pp, (stage + 1) x L / pp), the embedding on the first stage and the final norm and
    lm head on the last (a tied embedding is copied there when pp > 1). ZeRO sharding comes on top.
    """
    c = config
    h, hd, tp = c.hidden_size, c.head_dim, w.tp
    experts, f = c.num_local_experts // w.ep, c.intermediate_size // w.etp
    per_stage = c.num_hidden_layers // w.pp
    shapes: dict[str, tuple[int, ...]] = {}
    if stage == 0:
        shapes["embed_tokens.weight"] = (c.vocab_size // tp, h)
    for i in range(stage * per_stage, (stage + 1) * per_stage):
        shapes.update(
            {
                f"layers.{i}.{name}": shape
                for name, shape in (
                    ("input_layernorm.weight", (h,)),
                    ("self_attn.q_proj.weight", (c.num_attention_heads * hd // tp, h)),
                    ("self_attn.k_proj.weight", (c.num_key_value_heads * hd // tp, h)),
                    ("self_attn.v_proj.weight", (c.num_key_value_heads * hd // tp, h)),
                    ("self_attn.o_proj.weight", (h, c.num_attention_heads * hd // tp)),
                    ("post_attention_layernorm.weight", (h,)),
                    ("mlp.gate.weight", (c.num_local_experts, h)),
                    ("mlp.experts.gate_up_proj", (experts, 2 * f, h)),
                    ("mlp.experts.down_proj", (experts, h, f)),
                )
            }
        )
    if stage == w.pp - 1:
        shapes["norm.weight"] = (h,)
        if not c.tie_word_embeddings or w.pp > 1:
            shapes["lm_head.weight"] = (c.vocab_size // tp, h)
    return shapes


def is_expert(name: str) -> bool:
    """Expert weights shard over ep x etp and replicate over edp ranks; every other parameter over dp x cp."""
    return ".experts." in name


def stage_parameters(config: ModelConfig, w: Workload, stage: int) -> tuple[int, int]:
    """(dense, expert) parameters one rank of the pipeline stage holds, after tp and ep x etp sharding."""
    counts = [0, 0]
    for name, shape in shard_shapes(config, w, stage).items():
        counts[is_expert(name)] += math.prod(shape)
    return counts[0], counts[1]


# training bytes per parameter (weights, gradients, optimizer states), and the ZeRO level that shards each row
BYTES_PER_PARAMETER = {"fp32": (4, 4, 8), "bf16": (4, 4, 8), "bf16_master": (2, 4, 12)}
TRAINING_ROWS = (("weights", 3), ("gradients", 2), ("optimizer states", 1))


def _act_bytes(w: Workload) -> int:
    return 4 if w.precision == "fp32" else 2


def layer_activations(config: ModelConfig, w: Workload) -> dict[str, float]:
    """Saved bytes per layer per micro-batch: attention, moe, and the input kept under checkpointing."""
    a, h, f = _act_bytes(w), config.hidden_size, config.intermediate_size
    T = w.micro_batch * w.seq_len / w.cp
    t = T / w.tp if w.sp else T
    t_moe = min(T, t * w.etp)
    rows = config.num_experts_per_tok * t_moe * w.pad
    heads = 2 * (config.num_attention_heads + config.num_key_value_heads) * config.head_dim
    # allgather context parallelism keeps the other cp ranks' K and V for the backward pass; ring passes them on
    gathered = (
        (w.cp - 1) * T * 2 * config.num_key_value_heads * config.head_dim / w.tp if w.cp_algo == "allgather" else 0
    )
    return {
        "attention": a * (2 * h * t + T * heads / w.tp + gathered),
        "moe": a * (2 * h * t + rows * (2 * h + 3 * f / w.etp)) + 8 * t_moe * config.num_local_experts,
        "input": a * h * t,
    }


def _stage_activations(config: ModelConfig, w: Workload, stage: int) -> float:
    layers = config.num_hidden_layers // w.pp
    act = layer_activations(config, w)
    whole = act["attention"] + act["moe"]
    if w.mode == "inference":
        return whole  # one layer's prefill working set; nothing is kept for a backward pass
    per_layer = {
        "none": layers * whole,
        "full": layers * act["input"] + whole,
        "selective": (layers // 2) * whole + (layers - layers // 2) * act["input"] + whole,
        "moe": layers * (act["attention"] + act["input"]) + act["moe"],
    }[w.checkpointing]
    in_flight = min(w.pp - stage, w.micro_batches)
    return in_flight * per_layer


def estimate_memory(config: ModelConfig, w: Workload, device: Device) -> MemoryEstimate:
    """Bytes per device for the busiest pipeline stage (see the module docstring for every formula)."""
    if w.checkpointing not in CHECKPOINTING:
        raise MixtralError(
            f"activation_checkpointing '{w.checkpointing}' is unknown; choose one of: {', '.join(CHECKPOINTING)}"
        )
    if w.mode not in MODES:
        raise MixtralError(f"mode '{w.mode}' is unknown; choose one of: {', '.join(MODES)}")
    return max((stage_memory(config, w, device, stage) for stage in range(w.pp)), key=lambda e: e.total)


def stage_memory(config: ModelConfig, w: Workload, device: Device, stage: int) -> MemoryEstimate:
    """Bytes per device of one pipeline stage's ranks."""
    return MemoryEstimate(device, stage, tuple(_stage_rows(config, w, device, stage)))


def parameter_rows(w: Workload) -> list[tuple[str, int | None, int]]:
    """(memory row, the ZeRO level from which it is sharded or None, bytes per parameter) of the parameters."""
    if w.mode == "inference":
        return [("weights", None, 4 if w.precision == "fp32" else 2)]
    return [(row, level, per) for (row, level), per in zip(TRAINING_ROWS, BYTES_PER_PARAMETER[w.precision])]


def _stage_rows(config: ModelConfig, w: Workload, device: Device, stage: int) -> list[tuple[str, float]]:
    dense, expert = stage_parameters(config, w, stage)
    groups = (w.dp * w.cp, w.edp)
    T = w.micro_batch * w.seq_len / w.cp

    def sharded(level: int | None) -> float:
        return sum(n / (g if level is not None and w.zero >= level else 1) for n, g in zip((dense, expert), groups))

    rows = [(row, sharded(level) * per) for row, level, per in parameter_rows(w)]
    if w.mode == "inference":
        kv_heads = max(1, config.num_key_value_heads // w.tp)
        kv = 2 * (config.num_hidden_layers // w.pp) * kv_heads * config.head_dim * T * 2
        rows += [("KV cache", kv), ("activations (one layer prefill)", _stage_activations(config, w, stage))]
    else:
        if w.zero == 3:
            weight, grad, _ = BYTES_PER_PARAMETER[w.precision]
            layer = (dense + expert) / (config.num_hidden_layers // w.pp)
            rows.append(("ZeRO-3 gathered layers", layer * (2 * weight + grad)))
        rows.append(("activations", _stage_activations(config, w, stage)))
        if stage == w.pp - 1:
            rows.append(("logits", T * config.vocab_size / w.tp * (_act_bytes(w) + 4)))
    rows.append(("reserve (runtime, buffers)", RESERVE * device.memory_gib * GiB))
    return rows


# --------------------------------------------------------------------------------------------- step time


@dataclass(frozen=True)
class StepTime:
    """Seconds per optimizer step by part, and what they imply."""

    parts: dict[str, float]
    tokens: int
    devices: int
    model_flops: float  # per step, without recomputation
    peak: float  # FLOP/s per device

    @property
    def total(self) -> float:
        return sum(self.parts.values())

    @property
    def tokens_per_device(self) -> float:
        return self.tokens / self.total / self.devices

    @property
    def mfu(self) -> float:
        return self.model_flops / self.total / self.devices / self.peak

    def table(self) -> str:
        lines = ["estimated step time (cost model, nothing overlapped):"]
        lines += [f"  {k:<30} {v:9.3f} s" for k, v in self.parts.items()]
        lines.append(
            f"  {'total':<30} {self.total:9.3f} s  ({self.tokens_per_device:,.0f} tokens/s/device, MFU {self.mfu:.1%})"
        )
        return "\n".join(lines)


def _bandwidth(device: Device, span: int) -> float:
    """Bytes/s per device for a group whose ranks spread over `span` consecutive ranks."""
    return (device.intra_gbs if span <= device.link_domain else device.inter_gbs) * 1e9


def step_time(config: ModelConfig, w: Workload, device: Device) -> StepTime:
    """The documented cost model (module docstring) for one training step."""
    a, h, k = _act_bytes(w), config.hidden_size, config.num_experts_per_tok
    layers, m = config.num_hidden_layers // w.pp, w.micro_batches
    tokens = w.global_batch * w.seq_len
    expert_fwd = 2 * k * 3 * h * config.intermediate_size * config.num_hidden_layers
    model_flops = config.flops_per_token(w.seq_len) * tokens
    recompute = {"none": 0.0, "selective": 0.5, "full": 1.0, "moe": 0.0}[w.checkpointing]
    flops = model_flops / 3 * (3 + recompute) + tokens * expert_fwd * (3 * (w.pad - 1) + (w.checkpointing == "moe"))
    parts = {"compute": flops / w.world_size / (device.peak_tflops * 1e12 * device.mfu)}

    T = w.micro_batch * w.seq_len / w.cp
    t = T / w.tp if w.sp else T
    per_layer_mb = layers * m
    tp_ops = 4 * (1 + (w.etp > 1))
    parts["tp"] = per_layer_mb * tp_ops * (w.tp - 1) / w.tp * T * h * a / _bandwidth(device, w.tp) if w.tp > 1 else 0.0
    kv = 2 * config.num_key_value_heads * config.head_dim
    passes = 3 if w.cp_algo == "ring" else 2
    parts["cp"] = per_layer_mb * passes * (w.cp - 1) * T * kv * a / _bandwidth(device, w.cp * w.tp)
    group = w.ep * w.etp
    if w.ep_comm == "allgather":
        ep_bytes = 4 * (group - 1) * t * h * a if group > 1 else 0.0
    else:
        ep_bytes = 4 * k * t * h * a * w.pad * (w.ep - 1) / w.ep
    parts["ep"] = per_layer_mb * ep_bytes / _bandwidth(device, group)
    work = sum(parts.values())
    p2p = 2 * m * t * h * a / _bandwidth(device, w.world_size) if w.pp > 1 else 0.0
    parts["pp bubble + sends"] = work * (w.pp - 1) / m + p2p
    parts["dp"] = _dp_time(config, w, device)
    return StepTime(parts, tokens, w.world_size, model_flops, device.peak_tflops * 1e12)


def _dp_time(config: ModelConfig, w: Workload, device: Device) -> float:
    weight, grad, _ = BYTES_PER_PARAMETER[w.precision]
    m = w.micro_batches
    seconds = 0.0
    for params, g in zip(stage_parameters(config, w, 0), (w.dp * w.cp, w.edp)):
        if g == 1:
            continue
        per_step = {0: 2 * grad, 1: grad + weight, 2: m * grad + weight, 3: m * (grad + 2 * weight)}[w.zero]
        seconds += params * per_step * (g - 1) / g / _bandwidth(device, w.dp * w.cp * w.tp)
    return seconds


# ------------------------------------------------------------------------------------------------- checks


def check_layout(config: ModelConfig, w: Workload, devices: int | None = None) -> None:
    """World size and every divisibility rule (ParallelDims), the batch and the sequence length."""
    from mixtral.parallel.dims import ParallelDims

    dims = ParallelDims(
        dp=w.dp, tp=w.tp, pp=w.pp, cp=w.cp, ep=w.ep, etp=w.etp, sp=w.sp, world_size=devices or w.world_size
    )
    dims.validate_model(config, w.seq_len)
    if w.seq_len > config.max_position_embeddings:
        raise MixtralError(
            f"seq_len {w.seq_len} exceeds the model's max_position_embeddings "
            f"({config.max_position_embeddings}); lower seq_len or raise "
            f"model.max_position_embeddings"
        )
    if w.ep_comm not in EP_COMMS:
        raise MixtralError(f"moe.ep_comm '{w.ep_comm}' is unknown; choose one of: {', '.join(EP_COMMS)}")
    if w.zero == 0 and w.tp > 1:
        raise MixtralError(
            "parallel.zero=0 (DDP) does not compose with tensor parallelism; set parallel.zero to "
            "1, 2 or 3 (FSDP2) when parallel.tp > 1"
        )
    if w.cp_algo not in CP_ALGOS:
        raise MixtralError(f"parallel.cp_algo '{w.cp_algo}' is unknown; choose one of: {', '.join(CP_ALGOS)}")


def check_hardware(w: Workload, device: Device, devices: int | None, nodes: int | None) -> None:
    """hardware.nodes against the devices and the device's devices per host."""
    count = devices or w.world_size
    if nodes and nodes != -(-count // device.per_host):
        raise MixtralError(
            f"hardware.nodes={nodes}: {count} devices on {device.name} ({device.per_host} per "
            f"node) need {-(-count // device.per_host)} nodes; set hardware.nodes to that"
        )


def check_dispatcher(dispatcher: str, backend_name: str) -> None:
    """Static-shape backends (SPMD, graph mode) need a dispatcher whose expert inputs have fixed shapes."""
    from mixtral.backend import registry

    backends = registry().backends
    if backend_name not in backends:
        raise MixtralError(
            f"recipe key 'backend': unknown backend '{backend_name}'; registered backends: "
            f"{', '.join(sorted(backends))}"
        )
    caps = backends[backend_name].capabilities
    if dispatcher == "dropless" and (caps.spmd or not caps.dynamic_shapes):
        why = "an SPMD backend compiles one static program" if caps.spmd else "it runs static-shape graphs"
        raise MixtralError(
            f"recipe key 'moe.dispatcher': 'dropless' gives data-dependent shapes, which backend "
            f"'{backend_name}' cannot run ({why}); set moe.dispatcher=capacity with "
            f"moe.capacity_factor=1.25, or moe.dispatcher=capacity_bins "
            f"(its preferred one is {caps.preferred_dispatcher})"
        )


def _fix_candidates(config: ModelConfig, w: Workload) -> list[tuple[str, Workload]]:
    """Single changes that keep the device count and lower memory, most cost-effective first."""
    out = []
    if w.mode == "train":
        stronger = [m for m in ("selective", "full") if CHECKPOINTING.index(m) > CHECKPOINTING.index(w.checkpointing)]
        out += [(f"activation_checkpointing={mode}", w.replace(checkpointing=mode)) for mode in stronger]
        if w.zero < 3 and w.dp * w.cp > 1:
            out.append((f"parallel.zero={w.zero + 1}", w.replace(zero=w.zero + 1)))
    if w.micro_batch > 1 and w.micro_batch % 2 == 0:
        out.append((f"batch.micro_batch={w.micro_batch // 2}", w.replace(micro_batch=w.micro_batch // 2)))
    if w.ep * 2 <= config.num_local_experts:
        out.append((f"parallel.ep={w.ep * 2}", w.replace(ep=w.ep * 2)))
    if w.dp % 2 == 0:
        for dim in ("pp", "tp", "cp"):
            value = getattr(w, dim) * 2
            extra = " parallel.sp=true" if dim == "tp" and not w.sp else ""
            changed = w.replace(dp=w.dp // 2, **{dim: value}, **({"sp": True} if extra else {}))
            out.append((f"parallel.{dim}={value} parallel.dp={w.dp // 2}{extra}", changed))
    valid = []
    for text, candidate in out:
        try:
            check_layout(config, candidate)
        except MixtralError:
            continue
        if candidate.mode == "train" and candidate.global_batch % (candidate.micro_batch * candidate.dp):
            continue
        valid.append((text, candidate))
    return valid


def check_memory(config: ModelConfig, w: Workload, device: Device, what: str = "the layout") -> MemoryEstimate:
    """The estimate, or a MixtralError naming the largest part and the single changes that make it fit."""
    estimate = estimate_memory(config, w, device)
    if estimate.fits:
        return estimate
    largest = max(estimate.rows, key=lambda row: row[1])
    fixes = [
        f"{text} ({other.total / GiB:.1f} GiB)"
        for text, candidate in _fix_candidates(config, w)
        if (other := estimate_memory(config, candidate, device)).fits
    ]
    if fixes:
        advice = "change one of: " + "; ".join(fixes[:4])
    else:
        grown = [
            f"parallel.{dim}={getattr(w, dim) * factor} on {w.world_size * factor} devices"
            for dim in ("pp", "tp")
            for factor in (2, 4, 8)
            if _fits(config, w.replace(**{dim: getattr(w, dim) * factor}), device)
        ]
        advice = (
            "no change on the same devices fits; "
            + (f"use more devices: {grown[0]}" if grown else "use more devices")
            + " (`mixtral-run recipe plan --devices N --device-type ...` lists "
            "layouts that fit)"
        )
    raise MixtralError(
        f"{what} does not fit on {device.label}: {estimate.total / GiB:.1f} GiB per device "
        f"(pipeline stage {estimate.stage}) > {device.memory_gib:g} GiB; the largest part is "
        f"{largest[0]} ({largest[1] / GiB:.1f} GiB); {advice}"
    )


def _fits(config: ModelConfig, w: Workload, device: Device) -> bool:
    try:
        check_layout(config, w)
    except MixtralError:
        return False
    return estimate_memory(config, w, device).fits


# ------------------------------------------------------------------------------------------------ search


@dataclass(frozen=True)
class Plan:
    workload: Workload
    memory: MemoryEstimate
    time: StepTime


def plan_layouts(
    config: ModelConfig,
    device: Device,
    devices: int,
    seq_len: int,
    global_batch: int,
    micro_batch: int = 1,
    max_tp: int = 8,
) -> list[Plan]:
    """Every layout of `devices` that passes the checks and fits, with its cheapest fitting checkpointing and
    ZeRO level, sorted by estimated step time. SPMD backends (XLA) get FSDP (zero 3) x tensor x expert only."""
    from mixtral.backend import registry

    caps = registry().backends[device.backend].capabilities
    dispatcher = caps.preferred_dispatcher
    factor = 1.25 if dispatcher == "capacity" else None
    spmd = caps.spmd
    tps = [
        t
        for t in divisors(math.gcd(config.num_attention_heads, config.num_key_value_heads))
        if t <= min(max_tp, device.link_domain)
    ]
    pps = [1] if spmd else divisors(config.num_hidden_layers)
    cps = [1] if spmd else [c for c in (1, 2, 4, 8) if seq_len % c == 0]
    zeros = (3,) if spmd else (1, 3)
    plans = []
    for tp, pp, cp, ep in itertools.product(tps, pps, cps, divisors(config.num_local_experts)):
        if devices % (tp * pp * cp):
            continue
        dp = devices // (tp * pp * cp)
        if global_batch % (micro_batch * dp):
            continue
        for etp in sorted({1, tp}):
            base = Workload(
                dp=dp,
                tp=tp,
                pp=pp,
                cp=cp,
                ep=ep,
                etp=etp,
                sp=tp > 1,
                micro_batch=micro_batch,
                global_batch=global_batch,
                seq_len=seq_len,
                dispatcher=dispatcher,
                capacity_factor=factor,
            )
            try:
                check_layout(config, base, devices)
            except MixtralError:
                continue
            best = None
            for zero, mode in itertools.product(zeros, ("none", "selective", "full")):
                w = base.replace(zero=zero, checkpointing=mode)
                memory = estimate_memory(config, w, device)
                if not memory.fits:
                    continue
                plan = Plan(w, memory, step_time(config, w, device))
                if best is None or plan.time.total < best.time.total:
                    best = plan
            if best is not None:
                plans.append(best)
    return sorted(plans, key=lambda p: p.time.total)
