"""Parallel layouts on torch.distributed: device meshes, data (DDP / FSDP2), tensor, sequence, expert and context
parallelism."""

from mixtral.parallel.context_parallel import context_layout, shard_sequence
from mixtral.parallel.data_parallel import (
    apply_data_parallel,
    mean_over,
    microbatch_sync,
)
from mixtral.parallel.dims import ParallelDims, ParallelMeshes
from mixtral.parallel.expert_parallel import (
    apply_expert_data_parallel,
    expert_checkpoint_views,
    expert_layout,
    expert_parameters,
    full_expert_weight,
)
from mixtral.parallel.launch import DistInfo, fail_fast, init_distributed
from mixtral.parallel.parallelize import Parallelized, clip_grad_norm_, model_layout, parallelize
from mixtral.parallel.pipeline_parallel import Pipeline, PipelinedModel, PipelineStageModel
from mixtral.parallel.shards import ShardMap
from mixtral.parallel.tensor_parallel import apply_tensor_parallel

__all__ = [
    "DistInfo",
    "ParallelDims",
    "ParallelMeshes",
    "Parallelized",
    "Pipeline",
    "PipelineStageModel",
    "PipelinedModel",
    "ShardMap",
    "apply_data_parallel",
    "apply_expert_data_parallel",
    "apply_tensor_parallel",
    "clip_grad_norm_",
    "context_layout",
    "expert_layout",
    "model_layout",
    "expert_checkpoint_views",
    "expert_parameters",
    "fail_fast",
    "full_expert_weight",
    "init_distributed",
    "mean_over",
    "microbatch_sync",
    "parallelize",
    "shard_sequence",
]
