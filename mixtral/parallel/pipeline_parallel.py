"""Pipeline parallelism with torch.distributed.pipelining: a Mixtral cut into stages of whole blocks.

Stage s of pp owns blocks [s * L / pp, (s + 1) * L / pp); the first stage also owns the embedding, the last
the final norm, the lm head and the loss. Stages hand on (hidden states, router totals): the totals
(moe.router_totals) are additive, so each stage adds its blocks' share and the last stage computes the
load-balancing and z losses over every layer exactly as one process does; their gradients flow back through
the totals to every stage's routers. Each pipeline micro-batch's loss is its own mean and the schedule
averages gradients over micro-batches: one process accumulating the same micro-batches computes the same.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

from mixtral.errors import MixtralError
from mixtral.model import Mixtral, ModelOutput
from mixtral.model.moe import MoEStats, router_totals
from mixtral.model.transformer import run_blocks

SCHEDULES = {"1f1b": Schedule1F1B, "gpipe": ScheduleGPipe}
PipelineSchedule = Literal["1f1b", "gpipe"]


class StageLayers(nn.ModuleDict):
    """A stage's blocks keyed by their index in the whole model (parameter names stay the whole model's),
    iterated as blocks like the model's ModuleList, so code walking `model.layers` works on a stage too."""

    def __iter__(self):
        return iter(self.values())


class PipelineStageModel(nn.Module):
    """This rank's stage of a Mixtral. forward: tokens (first stage) or (hidden, router totals) ->
    (hidden, router totals), or (logits, router totals) on the last stage."""

    def __init__(self, model: Mixtral, stage: int, stages: int, sequence_shards: int = 1) -> None:
        super().__init__()
        layers = model.config.num_hidden_layers
        if layers % stages:
            raise MixtralError(
                f"parallel.pp={stages}: the model's {layers} layers do not split evenly into "
                f"{stages} stages; choose pp from the divisors of {layers}"
            )
        if model.lm_head is None and stages > 1:
            raise MixtralError(
                "parallel.pp > 1 needs an untied lm head (the embedding lives on the first stage, the "
                "head on the last); set model.tie_word_embeddings=false or parallel.pp=1"
            )
        per = layers // stages
        self.is_first, self.is_last = stage == 0, stage == stages - 1
        self.embed_tokens = model.embed_tokens if self.is_first else None
        self.layers = StageLayers({str(i): model.layers[i] for i in range(stage * per, (stage + 1) * per)})
        self.norm = model.norm if self.is_last else None
        self.lm_head = model.lm_head if self.is_last else None
        self.sequence_shards = sequence_shards  # tp under sequence parallelism: hidden states hold S / tp positions
        self.num_experts, self.top_k = model.config.num_local_experts, model.config.num_experts_per_tok
        self.layer_inputs = model.layer_inputs  # the whole model's rope tables
        self.routing: list[list[MoEStats]] = []  # this stage's blocks' routing, per training forward
        owned = set(self.modules())
        for module in (model.embed_tokens, *model.layers, model.norm, model.lm_head):
            if module not in owned:
                module.to("meta")  # other stages' weights: free their memory on this rank

    def forward(
        self,
        x: torch.Tensor,
        totals: torch.Tensor | None = None,
        start: int = 0,
        last_only: bool = False,
        pad: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """start, last_only and pad as Mixtral.forward's (generation with a KV cache)."""
        if self.embed_tokens is not None:
            x = self.embed_tokens(x)
        positions = x.new_empty(x.shape[0], x.shape[1] * self.sequence_shards)  # only its shape and device are read
        inputs = self.layer_inputs(positions, start, pad, x.dtype)
        x, routing = run_blocks(self.layers, x, inputs, last_only and self.norm is not None)
        if self.training:
            self.routing.append([MoEStats(None, r.counts, r.dropped, r.capacity, r.bin) for r in routing])  # no logits
        stage_totals = router_totals([r.logits for r in routing], self.num_experts, self.top_k)
        totals = stage_totals if totals is None else totals + stage_totals
        if self.norm is None:
            return x, totals
        return self.lm_head(self.norm(x)), totals


class Pipeline:
    """One rank's pipeline stage and its schedule (GPipe or 1F1B) over the pp process group."""

    def __init__(
        self,
        stage_model: nn.Module,
        pp_mesh: DeviceMesh,
        microbatches: int,
        schedule: PipelineSchedule,
        device: torch.device,
        loss: Callable | None = None,
    ) -> None:
        """loss(logits, router totals, targets) -> (loss, ce, aux, z): the trainer's (mixtral.train.loss)."""
        if schedule not in SCHEDULES:
            raise MixtralError(f"parallel.pp_schedule is {schedule!r}; choose one of {', '.join(SCHEDULES)}")
        stages = pp_mesh.size()
        if schedule == "1f1b" and microbatches < stages:
            raise MixtralError(
                f"1F1B needs at least as many micro-batches as pipeline stages: {microbatches} < "
                f"parallel.pp={stages}; raise batch.global_batch / (batch.micro_batch x parallel.dp) "
                f"to {stages} or more, or set parallel.pp_schedule=gpipe"
            )
        self.model, self.mesh, self.device, self.loss = stage_model, pp_mesh, device, loss
        self.stage_index, self.stages = pp_mesh.get_local_rank(), stages
        self.is_first, self.is_last = self.stage_index == 0, self.stage_index == stages - 1
        self.microbatches = microbatches
        self.losses: list[torch.Tensor] = []  # the last stage's (loss, ce, aux) per micro-batch of the latest step
        self.schedule = SCHEDULES[schedule](self._stage(), microbatches, loss_fn=self._loss)
        self._forward_only: dict[tuple[int, ...], ScheduleGPipe] = {}

    def _stage(self) -> PipelineStage:
        return PipelineStage(self.model, self.stage_index, self.stages, self.device, group=self.mesh.get_group())

    def _loss(self, output: tuple[torch.Tensor, torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
        loss, ce, aux, _ = self.loss(*output, targets)
        self.losses.append(torch.stack([loss, ce, aux]).detach().float())
        return loss

    def step(self, tokens: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, list[list[MoEStats]]]:
        """Forward and backward of a batch split into the micro-batches, gradients averaged over them.

        Returns the last stage's (loss, ce loss, aux loss) per micro-batch [microbatches, 3], on every rank, and this
        stage's blocks' routing per micro-batch. On its first call the schedule runs the stages once more to learn
        the shapes; only the last `microbatches` losses and routings are the step's own.
        """
        self.losses = []
        self.model.routing.clear()
        self.schedule.step(*((tokens,) if self.is_first else ()), target=targets if self.is_last else None)
        steps = slice(-self.microbatches, None)
        losses = self.from_last_stage(lambda: torch.stack(self.losses[steps]), (self.microbatches, 3))
        return losses, self.model.routing[steps]

    @torch.no_grad()
    def forward(self, tokens: torch.Tensor, **kwargs) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Forward only, the batch as one micro-batch: the last stage's (logits, router totals), None elsewhere."""
        key = tuple(tokens.shape)
        if key not in self._forward_only:  # a stage's buffers have a fixed shape: one forward schedule per shape
            self._forward_only[key] = ScheduleGPipe(self._stage(), 1)
        return self._forward_only[key].step(*((tokens,) if self.is_first else ()), **kwargs)

    def cross_entropy(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Evaluation: this batch's cross-entropy [1], on every rank."""
        output = self.forward(tokens)

        def ce() -> torch.Tensor:
            return self.loss(*output, targets)[1].float().reshape(1)

        return self.from_last_stage(ce, (1,))

    def from_last_stage(self, compute, shape: tuple[int, ...]) -> torch.Tensor:
        """compute() on the last stage, handed to every stage of the pipeline (a sum with zeros elsewhere)."""
        value = compute() if self.is_last else torch.zeros(shape, device=self.device)
        dist.all_reduce(value, op=dist.ReduceOp.SUM, group=self.mesh.get_group())
        return value


class PipelinedModel:
    """A Mixtral's calls for generation (forward, setup_caches, clear_caches) run through a pipeline: every stage
    makes each call together (mixtral.serve.distributed's leader and followers) and all get the logits."""

    def __init__(self, pipeline: Pipeline, model: Mixtral) -> None:
        self.pipeline, self.whole = pipeline, model

    def __getattr__(self, name: str):  # config, layers (their KV caches), embed_tokens: the whole model's
        return getattr(self.whole, name)

    def parameters(self):
        return self.pipeline.model.parameters()

    def eval(self) -> PipelinedModel:
        self.pipeline.model.eval()
        return self

    def setup_caches(
        self, batch: int, max_len: int, dtype: torch.dtype | None = None, device: torch.device | None = None
    ) -> None:
        """KV caches for this stage's layers, and layer 0's (Mixtral.layer_inputs reads it to know a cache is on)."""
        mine = list(self.pipeline.model.layers)
        layers = mine if self.whole.layers[0] in mine else [self.whole.layers[0], *mine]
        self.whole.setup_caches(batch, max_len, dtype, device or self.pipeline.device, layers)

    def forward(
        self, tokens: torch.Tensor, start: int = 0, last_only: bool = False, pad: torch.Tensor | None = None
    ) -> ModelOutput:
        """Mixtral.forward for generation: the logits (fp32) on every stage (the routing stays on each stage)."""
        output = self.pipeline.forward(tokens, start=start, last_only=last_only, pad=pad)
        shape = (tokens.shape[0], 1 if last_only else tokens.shape[1], self.whole.config.vocab_size)
        return ModelOutput(self.pipeline.from_last_stage(lambda: output[0].float(), shape), [])

    __call__ = forward
