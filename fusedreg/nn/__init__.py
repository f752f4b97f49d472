"""Drop-in modules: subclasses of the torch.nn modules they replace."""
from .batch_norm import BatchNorm1d, BatchNorm2d, BatchNorm3d
from .convert import convert_modules
from .dropout import Dropout
from .sync_batch_norm import SyncBatchNorm

__all__ = ["convert_modules", "Dropout", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "SyncBatchNorm"]
