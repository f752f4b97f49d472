"""fusedreg.optim: optimizers whose step is a fused multi-tensor kernel."""
from .adamw import AdamW

__all__ = ["AdamW"]
