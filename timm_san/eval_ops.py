""" Eval-mode replacement of SAN's 2x2 max-pool

On CPU, ``MaxPool2d`` on NCHW maps runs a kernel that also computes indices and is several times slower than
two elementwise maxima of strided views. Taken in eval mode only; equals the module exactly. (The 1x1 convs as
batched matmuls, for eval and training, are in ``timm_san.matmul_conv``.)
"""
import torch
import torch.nn.functional as F
from timm.layers import register_notrace_function

from .fusable import needs_grad

__all__ = ['max_pool2x2']


@register_notrace_function
def max_pool2x2(x: torch.Tensor) -> torch.Tensor:
    """``max_pool2d(x, 2, 2)`` (floor mode: an odd last row or column is dropped).

    Args:
        x: Tensor of shape ``(B, C, H, W)``.

    Returns:
        Tensor of shape ``(B, C, H // 2, W // 2)``.
    """
    if x.device.type != 'cpu' or needs_grad(x):
        # the pool's own gradient (one winner per window; torch.maximum would split ties); accelerators' own pool
        return F.max_pool2d(x, 2, 2)
    height, width = x.shape[-2] // 2 * 2, x.shape[-1] // 2 * 2
    # row pairs first: both operands are runs of whole rows
    rows = torch.maximum(x[..., 0:height:2, :width], x[..., 1:height:2, :width])
    return torch.maximum(rows[..., 0::2], rows[..., 1::2])
