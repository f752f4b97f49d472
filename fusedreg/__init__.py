"""fusedreg: fused regularization kernels for PyTorch (dropout, AdamW, global-norm clipping,
BatchNorm), each in C++/CUDA, Triton and C++ CPU, with an eager PyTorch reference.

Importing builds nothing: the C++/CUDA libraries are JIT-built on first use (see fusedreg._build).
"""
import torch as _torch

# The oldest torch this package is tested on (CI runs the suite on it); older ones lack what the op
# registration, the JIT build and the modules rely on, and would fail later and less clearly.
TORCH_FLOOR = (2, 11)
if _torch.__version__ < TORCH_FLOOR:  # a TorchVersion: compares with tuples
    raise ImportError(f"fusedreg needs torch >= {'.'.join(map(str, TORCH_FLOOR))}, "
                      f"found torch {_torch.__version__}; upgrade torch")
from . import _library  # noqa: F401  (defines the torch.ops.fusedreg schemas)
from . import backends, nn
from . import optim  # noqa: F401  (fusedreg.optim.AdamW)
from ._backend import set_backend, use_backend
from ._build import BuildError
from .ops.batch_norm import BatchNormFunction, batch_norm
from .ops.dropout import DropoutFunction, dropout, dropout_add
from .utils.clip import clip_grad_norm_, clip_grads_with_norm_, get_total_norm

__version__ = "0.1.0"

__all__ = ["backends", "nn", "set_backend", "use_backend", "BuildError", "DropoutFunction", "dropout",
           "dropout_add", "BatchNormFunction", "batch_norm", "clip_grad_norm_", "clip_grads_with_norm_",
           "get_total_norm", "__version__"]
