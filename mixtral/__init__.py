"""mixtral-run: one Mixtral mixture-of-experts core for every accelerator, through pluggy backends."""

from mixtral.errors import MixtralError

__version__ = "0.1.0"
__all__ = ["MixtralError", "__version__"]
