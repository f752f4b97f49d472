"""fusedreg.nn.Dropout: torch.nn.Dropout computed by fusedreg's fused dropout (no mask kept)."""
from __future__ import annotations

import torch

from ..ops.dropout import dropout


class Dropout(torch.nn.Dropout):
    """Same constructor, checks, repr and state_dict as torch.nn.Dropout, plus `backend=`."""

    def __init__(self, p: float = 0.5, inplace: bool = False, *, backend: str | None = None):
        super().__init__(p, inplace)
        self.backend = backend

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return dropout(input, self.p, self.training, self.inplace, backend=self.backend)
