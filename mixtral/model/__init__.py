"""The device-agnostic Mixtral model: no vendor name, no device, no process group in here."""

from mixtral.kernels.reference import IGNORE_INDEX
from mixtral.model.transformer import Mixtral, ModelOutput

__all__ = ["IGNORE_INDEX", "Mixtral", "ModelOutput"]
