"""Drop-in modules: subclasses of the torch.nn modules they replace."""
from .dropout import Dropout

__all__ = ["Dropout"]
