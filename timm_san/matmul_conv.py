""" 1x1 convolutions of SAN as batched matrix products on CPU, forward and backward

On CPU a 1x1 conv of an NCHW batch goes through oneDNN with layout reorders (2+ threads) or an im2col path (1
thread). One batched matmul on the ``(B, C, H * W)`` view reads the map in place instead: on SAN's 112x112 and 56x56
maps that is 1.5 to 3x faster forward, and its backward (two more products) 2 to 2.5x faster than oneDNN's; on 7x7
maps oneDNN is faster, so small maps keep the conv. Results equal ``F.conv2d`` up to float rounding.
"""
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from timm.layers import register_notrace_function

from .fusable import needs_grad

__all__ = ['conv1x1', 'conv1x1_split', 'conv1x1_backward', 'MATMUL_MIN_SPATIAL']

# below this many pixels per map oneDNN's batched 1x1 conv beats per-sample matmuls (SAN's 7x7 last stage)
MATMUL_MIN_SPATIAL = 100
# 1x1 convs of one input are concatenated into one matmul only while the concatenated weights are at most this
# fraction of the input map (reading the map once saves more than copying the weights costs)
_CONCAT_MAX_WEIGHT_FRACTION = 1 / 8


def _use_matmul(x: torch.Tensor) -> bool:
    return x.device.type == 'cpu' and x.shape[-2] * x.shape[-1] >= MATMUL_MIN_SPATIAL


def _forward(
        x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], residual: Optional[torch.Tensor],
) -> torch.Tensor:
    batch, planes, height, width = x.shape
    out_planes = weight.shape[0]
    # a broadcast (stride 0) weight: bmm reads each sample in place (matmul would fold the batch into a copy)
    weight = weight.reshape(out_planes, planes).expand(batch, -1, -1)
    x = x.reshape(batch, planes, height * width)
    if residual is None:
        out = torch.bmm(weight, x)
        if bias is not None:
            out.add_(bias.view(1, -1, 1))
    else:
        # the residual (and bias) are the matmul's accumulator: one pass less than conv, then add
        residual = residual.reshape(batch, out_planes, height * width)
        out = residual + bias.view(1, -1, 1) if bias is not None else residual.clone()
        out.baddbmm_(weight, x)
    return out.view(batch, out_planes, height, width)


def conv1x1_backward(
        grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, input_grad: bool = True,
) -> Tuple[Optional[torch.Tensor], torch.Tensor, torch.Tensor]:
    """Gradients of ``conv2d(x, weight, bias)`` for a 1x1 kernel: input (if ``input_grad``), weight and bias.

    Args:
        grad: Gradient of the output ``(B, O, H, W)``.
        x: The conv's input ``(B, C, H, W)``.
        weight: Conv weight ``(O, C, 1, 1)``.
        input_grad: Whether to compute the input's gradient.

    Returns:
        ``(grad_x or None, grad_weight (O, C, 1, 1), grad_bias (O,))``.
    """
    if not _use_matmul(x):
        return tuple(torch.ops.aten.convolution_backward(
            grad, x, weight, None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1, [input_grad, True, True]))
    batch, planes, height, width = x.shape
    out_planes = weight.shape[0]
    grad = grad.reshape(batch, out_planes, height * width)
    x = x.reshape(batch, planes, height * width)
    grad_x = None
    if input_grad:
        matrix_t = weight.reshape(out_planes, planes).t().expand(batch, -1, -1)
        grad_x = torch.bmm(matrix_t, grad).view(batch, planes, height, width)
    # one product per sample, accumulated: a batched product would hold a (B, O, C) gradient per sample
    grad_weight = grad.new_zeros((out_planes, planes))
    for index in range(batch):
        grad_weight.addmm_(grad[index], x[index].t())
    return grad_x, grad_weight.view_as(weight), grad.sum((0, 2))


class _Conv1x1Fn(torch.autograd.Function):
    """``conv2d(x, weight, bias) + residual`` as matmuls forward and backward; saves ``x`` and ``weight``."""

    @staticmethod
    def forward(ctx, x, weight, bias, residual):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _forward(x, weight, bias, residual)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad_x, grad_weight, grad_bias = conv1x1_backward(grad.contiguous(), x, weight, ctx.needs_input_grad[0])
        return grad_x, grad_weight, grad_bias if ctx.has_bias else None, grad if ctx.needs_input_grad[3] else None


@register_notrace_function
def conv1x1(
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: Optional[torch.Tensor] = None,
        residual: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``conv2d(x, weight, bias) + residual`` for a 1x1 kernel, differentiable.

    Args:
        x: Tensor of shape ``(B, C, H, W)``.
        weight: Conv weight ``(O, C, 1, 1)``.
        bias: Conv bias ``(O,)`` or None.
        residual: Tensor of shape ``(B, O, H, W)`` added to the output, or None.

    Returns:
        Tensor of shape ``(B, O, H, W)``.
    """
    with_grad = needs_grad(x, weight, bias, residual)
    # the weight gradient accumulates over samples in the tensors' dtype: float32 or float64 only
    if not _use_matmul(x) or (with_grad and x.dtype not in (torch.float32, torch.float64)):
        out = F.conv2d(x, weight, bias)
        return out if residual is None else out.add_(residual)
    if with_grad:
        return _Conv1x1Fn.apply(x.contiguous(), weight, bias, residual)
    return _forward(x, weight, bias, residual)


@register_notrace_function
def conv1x1_split(
        x: torch.Tensor, weights: Sequence[torch.Tensor], biases: Sequence[Optional[torch.Tensor]],
) -> List[torch.Tensor]:
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
    return list(conv1x1(x, torch.cat(list(weights)), bias).split(sizes, dim=1))
