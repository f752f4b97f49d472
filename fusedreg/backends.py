"""Public view of the backend registry: `fusedreg.backends.available()` and friends."""
from ._backend import BACKENDS, BackendUnavailable, available, get_backend, select, set_backend, use_backend

__all__ = ["BACKENDS", "BackendUnavailable", "available", "get_backend", "select", "set_backend",
           "use_backend"]
