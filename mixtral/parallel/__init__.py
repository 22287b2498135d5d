"""Parallel layouts on torch.distributed: device meshes, data (DDP / FSDP2), tensor and sequence parallelism."""

from mixtral.parallel.data_parallel import (
           apply_data_parallel,
           mean_over,
           microbatch_sync,
)
from mixtral.parallel.dims import ParallelDims, ParallelMeshes
from mixtral.parallel.launch import DistInfo, fail_fast, init_distributed
from mixtral.parallel.tensor_parallel import apply_tensor_parallel

__all__ = ["DistInfo", "ParallelDims", "ParallelMeshes", "apply_data_parallel", "apply_tensor_parallel",
           "fail_fast", "init_distributed", "mean_over", "microbatch_sync"]
