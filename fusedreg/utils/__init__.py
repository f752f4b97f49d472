"""fusedreg.utils: global-norm gradient clipping (clip_grad_norm_, get_total_norm,
clip_grads_with_norm_) with torch.nn.utils' contract."""
from .clip import clip_grad_norm_, clip_grads_with_norm_, get_total_norm

__all__ = ["clip_grad_norm_", "clip_grads_with_norm_", "get_total_norm"]
