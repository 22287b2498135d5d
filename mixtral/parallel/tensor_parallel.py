"""Tensor and sequence parallelism for Mixtral with DTensor's `parallelize_module` (Megatron layout).

Attention: q/k/v column-parallel (each rank owns heads/tp query and kv heads), o_proj row-parallel.
Embedding row-parallel over the vocabulary. With sequence parallelism (sp) the residual stream and
the norms are sharded along the sequence (Shard(1)); o_proj and the embedding reduce-scatter into
it and attention all-gathers out of it. The MoE block stays replicated over tp (expert parallelism and
expert tensor parallelism shard it: expert_parallel.py): it gathers its input so that the router sees
every token of the local sequence on every tp rank (identical routing and aux loss on all of them) and
hands back this rank's sequence shard. An untied lm head is column-parallel over the vocabulary, its
logits gathered whole for the loss (loss parallel, which would keep them sharded, is not done). A tied
embedding stays whole: the model uses its weight as a plain F.linear weight, which no style can hook.
"""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Placement, Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    PrepareModuleInput,
    PrepareModuleOutput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)


class ReplicatedMoE(ParallelStyle):
    """MoE with whole experts on every tp rank: the input is gathered to the full local sequence and the
    output (the first of the block's (output, stats)) handed back in the residual stream's layout."""

    def __init__(self, seq_layout: Placement) -> None:
        super().__init__()
        self.seq = seq_layout

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        def gather(_: nn.Module, args: tuple) -> tuple:
            x = args[0]  # a DTensor from a SequenceParallel norm, or this rank's local shard
            if not isinstance(x, DTensor):
                x = DTensor.from_local(x, device_mesh, (self.seq,), run_check=False)
            return (x.redistribute(placements=(Replicate(),)).to_local(), *args[1:])

        def shard(_: nn.Module, args: tuple, output: tuple) -> tuple:
            out = DTensor.from_local(output[0], device_mesh, (Replicate(),), run_check=False)
            return (out.redistribute(placements=(self.seq,)).to_local(), *output[1:])

        module.register_forward_pre_hook(gather)
        module.register_forward_hook(shard)
        return module


def block_plan(sp: bool) -> dict[str, ParallelStyle | list[ParallelStyle]]:
    """The plan for one decoder block, keyed by submodule name."""
    seq = Shard(1) if sp else Replicate()
    plan: dict[str, ParallelStyle | list[ParallelStyle]] = {  # the block passes attention x alone by position
        "self_attn": PrepareModuleInput(input_layouts=(seq,), desired_input_layouts=(Replicate(),)),
        "self_attn.q_proj": ColwiseParallel(),
        "self_attn.k_proj": ColwiseParallel(),
        "self_attn.v_proj": ColwiseParallel(),
        "self_attn.o_proj": RowwiseParallel(output_layouts=seq),
    }
    if sp:
        plan["input_layernorm"] = SequenceParallel()
        plan["post_attention_layernorm"] = SequenceParallel()
        plan["mlp"] = ReplicatedMoE(seq)
    return plan


def apply_tensor_parallel(model: nn.Module, tp_mesh: DeviceMesh, sp: bool = False) -> nn.Module:
    """Shard a Mixtral in place over tp_mesh (1-D); sp shards norms and residuals along the sequence."""
    if tp_mesh.size() == 1:
        return model
    seq = Shard(1) if sp else Replicate()
    if model.lm_head is None:  # tied: the model reuses the embedding as a plain F.linear weight, keep it whole
        embed: ParallelStyle = PrepareModuleOutput(
            output_layouts=Replicate(), desired_output_layouts=seq, use_local_output=True
        )
    else:
        embed = RowwiseParallel(input_layouts=Replicate(), output_layouts=seq)
    top: dict[str, ParallelStyle | list[ParallelStyle]] = {"embed_tokens": embed}
    if sp:
        top["norm"] = [
            SequenceParallel(),
            PrepareModuleOutput(output_layouts=seq, desired_output_layouts=Replicate(), use_local_output=True),
        ]
    if model.lm_head is not None:
        top["lm_head"] = ColwiseParallel(output_layouts=Replicate())
    _parallelize(model, tp_mesh, top)
    for block in model.layers:
        _parallelize(block, tp_mesh, block_plan(sp))
    return model


def _parallelize(module: nn.Module, mesh: DeviceMesh, plan: dict[str, ParallelStyle | list[ParallelStyle]]) -> None:
    """parallelize_module, allowing several styles (each adds its own hooks) on one submodule."""
    for name, styles in plan.items():
        for style in styles if isinstance(styles, list) else [styles]:
            parallelize_module(module, mesh, {name: style})
