""" SAN's 1x1 convs, stem and 2x2 max-pools through the compiled CPU kernels (``csrc/ops.cpp``, ``csrc/pool.h``)

The stem's batch statistics, and the closed-form parts of its backward, are those of the ``cpu`` backend's
training stem (``timm_san.kernels.cpu.stem_train``); the passes over the full-resolution map run in C++.
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from ..common import bn_scale_shift, input_moments
from ..cpu.stem_train import add_statistics_grad, stem_statistics

__all__ = ['conv1x1', 'conv1x1_backward', 'max_pool2x2', 'max_pool2x2_backward', 'stem_eval', 'stem_forward',
           'stem_backward']

# below this many pixels (all samples together) oneDNN's 1x1 conv beats the pixel tiles, which then leave threads
# idle: b8 7x7 runs 1.3x faster, b1 7x7 1.7x at two threads (docs/kernels.md, "1x1 convs")
SMALL_MAP_PIXELS = 1024


def conv1x1(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``conv2d(x, weight, bias)`` for a 1x1 weight: tiles of pixels of every sample in parallel."""
    if x.shape[0] * x.shape[2] * x.shape[3] < SMALL_MAP_PIXELS:
        return F.conv2d(x, weight.reshape(weight.shape[0], -1, 1, 1), bias)
    matrix = weight.reshape(weight.shape[0], -1).contiguous()
    return torch.ops.timm_san_cpp.conv1x1(x.contiguous(), matrix, x.new_empty(0) if bias is None else bias)


def conv1x1_backward(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, input_grad: bool,
                     ) -> Tuple[Optional[torch.Tensor], torch.Tensor, torch.Tensor]:
    """Gradients of ``conv1x1``: the input's as a 1x1 conv of the transposed weight, the weight's and bias's as the
    cpu backend's (one product per sample, summed)."""
    from ..cpu.conv1x1 import conv1x1_backward as matmul_backward
    _, grad_weight, grad_bias = matmul_backward(grad, x, weight, input_grad=False)
    grad_x = None
    if input_grad:
        grad_x = conv1x1(grad, weight.reshape(weight.shape[0], -1).t(), None)
    return grad_x, grad_weight, grad_bias


def max_pool2x2(x: torch.Tensor) -> torch.Tensor:
    """``F.max_pool2d(x, 2, 2)``."""
    return torch.ops.timm_san_cpp.max_pool2x2(x.contiguous())


def max_pool2x2_backward(grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``F.max_pool2d``'s input gradient, each window's winner found again from ``x``."""
    return torch.ops.timm_san_cpp.max_pool2x2_backward(grad.contiguous(), x.contiguous())


def stem_eval(x: torch.Tensor, matrix: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """``relu(max_pool2d(conv2d(x, matrix) + shift, 2, 2))`` for a ``(O, C)`` matrix with the BatchNorm folded in."""
    return torch.ops.timm_san_cpp.stem(x.contiguous(), matrix.contiguous(), shift.contiguous(), False)[0]


def stem_forward(
        x: torch.Tensor, conv_weight: torch.Tensor, bn_weight: torch.Tensor, bn_bias: torch.Tensor, eps: float,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The training stem (batch statistics): ``(out, winners)`` as ``cpu.stem_train.stem_forward`` gives them."""
    weight, mean, var = stem_statistics(x, conv_weight)
    scale, shift = bn_scale_shift(bn_weight, bn_bias, mean, torch.rsqrt(var + eps))
    return torch.ops.timm_san_cpp.stem(
        x.contiguous(), (weight * scale.view(-1, 1)).contiguous(), shift.contiguous(), True)


def stem_backward(
        grad: torch.Tensor, x: torch.Tensor, out: torch.Tensor, argmax: torch.Tensor, conv_weight: torch.Tensor,
        bn_weight: torch.Tensor, eps: float, input_grad: bool = True,
) -> Tuple[Optional[torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of ``stem_forward``: ``(grad_x or None, grad_conv_weight, grad_bn_weight, grad_bn_bias)``."""
    weight, _, var = stem_statistics(x, conv_weight)
    mean_in, covariance = input_moments(x)
    invstd = torch.rsqrt(var + eps)
    scale = bn_weight * invstd
    folded = weight * scale.view(-1, 1)
    moment, grad_shift, grad_x = torch.ops.timm_san_cpp.stem_backward(
        grad.contiguous(), x.contiguous(), out, argmax, mean_in.contiguous(), folded.contiguous(), input_grad)
    moment, grad_shift = moment.to(x.dtype), grad_shift.to(x.dtype)
    grad_norm = (weight * moment).sum(dim=1)
    grad_conv = scale.view(-1, 1) * (moment - (grad_norm * invstd * invstd).view(-1, 1) * (weight @ covariance))
    if input_grad:
        add_statistics_grad(grad_x, x, mean_in, weight, folded, scale * grad_norm * invstd * invstd, grad_shift)
    return (grad_x if input_grad else None), grad_conv.view(conv_weight.shape), grad_norm * invstd, grad_shift
