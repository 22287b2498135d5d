"""The device-agnostic Mixtral model: no vendor name, no device, no process group in here."""

from mixtral.model.transformer import IGNORE_INDEX, Mixtral, ModelOutput

__all__ = ["IGNORE_INDEX", "Mixtral", "ModelOutput"]
