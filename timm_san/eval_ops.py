""" Eval-mode replacements of SAN's plain layers: a 2x2 max-pool and 1x1 convs as batched matmuls

On CPU, ``MaxPool2d`` on NCHW maps runs a kernel that also computes indices and is several times slower than
two elementwise maxima of strided views; a 1x1 conv of a batch goes through oneDNN with layout reorders (2+
threads) or an im2col path (1 thread), where one batched matmul on the ``(B, C, H * W)`` view reads the map in
place. These are taken in eval mode only; each equals its module up to float rounding.
"""
from typing import List, Optional

import torch
import torch.nn.functional as F
from timm.layers import register_notrace_function

__all__ = ['max_pool2x2', 'conv1x1', 'conv1x1_split', 'MATMUL_MIN_SPATIAL']

# below this many pixels per map oneDNN's batched 1x1 conv beats per-sample matmuls (SAN's 7x7 last stage)
MATMUL_MIN_SPATIAL = 100
# 1x1 convs of one input are concatenated into one matmul only while the concatenated weights are at most this
# fraction of the input map (reading the map once saves more than copying the weights costs)
_CONCAT_MAX_WEIGHT_FRACTION = 1 / 8


def _use_matmul(x: torch.Tensor) -> bool:
    return x.device.type == 'cpu' and x.shape[-2] * x.shape[-1] >= MATMUL_MIN_SPATIAL


@register_notrace_function
def max_pool2x2(x: torch.Tensor) -> torch.Tensor:
    """``max_pool2d(x, 2, 2)`` (floor mode: an odd last row or column is dropped).

    Args:
        x: Tensor of shape ``(B, C, H, W)``.

    Returns:
        Tensor of shape ``(B, C, H // 2, W // 2)``.
    """
    if x.device.type != 'cpu' or (torch.is_grad_enabled() and x.requires_grad):
        # the pool's own gradient (one winner per window; torch.maximum would split ties); accelerators' own pool
        return F.max_pool2d(x, 2, 2)
    height, width = x.shape[-2] // 2 * 2, x.shape[-1] // 2 * 2
    # row pairs first: both operands are runs of whole rows
    rows = torch.maximum(x[..., 0:height:2, :width], x[..., 1:height:2, :width])
    return torch.maximum(rows[..., 0::2], rows[..., 1::2])


@register_notrace_function
def conv1x1(
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: Optional[torch.Tensor] = None,
        residual: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``conv2d(x, weight, bias) + residual`` for a 1x1 kernel.

    Args:
        x: Tensor of shape ``(B, C, H, W)``.
        weight: Conv weight ``(O, C, 1, 1)``.
        bias: Conv bias ``(O,)`` or None.
        residual: Tensor of shape ``(B, O, H, W)`` added to the output, or None.

    Returns:
        Tensor of shape ``(B, O, H, W)``.
    """
    if not _use_matmul(x):
        out = F.conv2d(x, weight, bias)
        return out if residual is None else out.add_(residual)
    batch, planes, height, width = x.shape
    out_planes = weight.shape[0]
    spatial = height * width
    weight = weight.reshape(out_planes, planes).expand(batch, -1, -1)
    x = x.reshape(batch, planes, spatial)
    if residual is None:
        out = torch.bmm(weight, x)
        if bias is not None:
            out.add_(bias.view(1, -1, 1))
    else:
        # the residual (and bias) are the matmul's accumulator: one pass less than conv, then add
        residual = residual.reshape(batch, out_planes, spatial)
        out = residual + bias.view(1, -1, 1) if bias is not None else residual.clone()
        out.baddbmm_(weight, x)
    return out.view(batch, out_planes, height, width)


@register_notrace_function
def conv1x1_split(
        x: torch.Tensor, weights: List[torch.Tensor], biases: List[Optional[torch.Tensor]]) -> List[torch.Tensor]:
    """Several 1x1 convs of one input, as one matmul with the concatenated weights where that pays.

    Args:
        x: Tensor of shape ``(B, C, H, W)``.
        weights: Conv weights ``(O_i, C, 1, 1)``.
        biases: Conv biases ``(O_i,)``, each or None.

    Returns:
        ``conv2d(x, weights[i], biases[i])`` for each i; with one matmul these are channel slices of its output.
    """
    sizes = [w.shape[0] for w in weights]
    batch, spatial = x.shape[0], x.shape[-2] * x.shape[-1]
    if len(weights) < 2 or not _use_matmul(x) or sum(sizes) > _CONCAT_MAX_WEIGHT_FRACTION * batch * spatial:
        return [conv1x1(x, w, b) for w, b in zip(weights, biases)]
    bias: Optional[torch.Tensor] = None
    if any(b is not None for b in biases):
        bias = torch.cat([w.new_zeros(w.shape[0]) if b is None else b for w, b in zip(weights, biases)])
    return list(conv1x1(x, torch.cat(weights), bias).split(sizes, dim=1))
