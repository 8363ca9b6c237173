""" SAN's gather and aggregate operators (footprint, relations, aggregation) as PyTorch custom ops

Each is a ``torch.library.custom_op`` in the ``timm_san`` namespace with a fake kernel (for ``torch.compile`` and
``torch.export``) and registered autograd whose backward is itself an operator, so graphs capture both directions
as opaque calls. Inside, ``select_kernel`` picks the Triton kernel on CUDA and the reference elsewhere.
The public functions check their arguments and, while exporting to ONNX, write the reference out instead.
"""
from typing import List

import torch
from timm.layers import register_notrace_function
from torch.library import custom_op

from ..kernels import reference
from ..kernels import triton as triton_kernels
from ..kernels.cpu import aggregation as cpu_aggregation
from .dispatch import inline_reference, outside_autocast, select_kernel

__all__ = [
    'footprint', 'subtraction', 'subtraction2', 'aggregation', 'position_grid', 'footprint_backward', 'offset_sum',
    'aggregation_backward',
]

_TRITON = ('triton',)


def _uses_triton(op: str, x: torch.Tensor) -> bool:
    return select_kernel(op, x, backends=_TRITON) == 'triton'


# --- footprint gather and the relations, and their one backward (the footprint's scatter)

@custom_op('timm_san::footprint_backward', mutates_args=())
@outside_autocast
def footprint_backward(
        grad: torch.Tensor, height: int, width: int, kernel_size: int, negate: bool, centre: bool) -> torch.Tensor:
    """Gradient of a footprint gather (negated for the neighbour side of a relation, plus the centre's sum)."""
    if _uses_triton('footprint_backward', grad):
        return triton_kernels.footprint_backward(
            grad, height, width, kernel_size, grad.dtype, negate=negate, centre=centre)
    out = reference.footprint_backward(grad, height, width, kernel_size)
    if negate:
        out = out.neg_()
    if centre:
        out = out.add_(reference.offset_sum(grad, height, width))
    return out


@footprint_backward.register_fake
def _(grad, height, width, kernel_size, negate, centre):
    return grad.new_empty((grad.shape[0], grad.shape[1], height, width))


@custom_op('timm_san::offset_sum', mutates_args=())
@outside_autocast
def offset_sum(grad: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Gradient of a relation at its centre: the sum over the footprint, as a map."""
    if _uses_triton('offset_sum', grad):
        return triton_kernels.offset_sum(grad, height, width, grad.dtype)
    return reference.offset_sum(grad, height, width)


@offset_sum.register_fake
def _(grad, height, width):
    return grad.new_empty((grad.shape[0], grad.shape[1], height, width))


def _relation_like(x: torch.Tensor, kernel_size: int) -> torch.Tensor:
    return x.new_empty((x.shape[0], x.shape[1], kernel_size * kernel_size, x.shape[2] * x.shape[3]))


@custom_op('timm_san::footprint', mutates_args=())
@outside_autocast
def _footprint(x: torch.Tensor, kernel_size: int) -> torch.Tensor:
    if _uses_triton('footprint', x):
        return triton_kernels.footprint(x, kernel_size)
    return reference.footprint(x, kernel_size)


@custom_op('timm_san::subtraction', mutates_args=())
@outside_autocast
def _subtraction(x: torch.Tensor, kernel_size: int) -> torch.Tensor:
    # one input (an operator may not take one tensor twice where it is differentiated)
    if _uses_triton('subtraction', x):
        return triton_kernels.subtraction2(x, x, kernel_size)
    return reference.subtraction2(x, x, kernel_size)


@custom_op('timm_san::subtraction2', mutates_args=())
@outside_autocast
def _subtraction2(x1: torch.Tensor, x2: torch.Tensor, kernel_size: int) -> torch.Tensor:
    if _uses_triton('subtraction2', x1):
        return triton_kernels.subtraction2(x1, x2, kernel_size)
    return reference.subtraction2(x1, x2, kernel_size)


for _op in (_footprint, _subtraction):
    _op.register_fake(lambda x, kernel_size: _relation_like(x, kernel_size))
_subtraction2.register_fake(lambda x1, x2, kernel_size: _relation_like(x1, kernel_size))


def _save_map_size(ctx, inputs, output) -> None:
    ctx.kernel_size = inputs[-1]
    ctx.size = (inputs[0].shape[2], inputs[0].shape[3])


def _footprint_grad(ctx, grad):
    return footprint_backward(grad, *ctx.size, ctx.kernel_size, False, False), None


def _subtraction_grad(ctx, grad):
    return footprint_backward(grad, *ctx.size, ctx.kernel_size, True, True), None


def _subtraction2_grad(ctx, grad):
    grad1 = offset_sum(grad, *ctx.size) if ctx.needs_input_grad[0] else None
    grad2 = footprint_backward(grad, *ctx.size, ctx.kernel_size, True, False) if ctx.needs_input_grad[1] else None
    return grad1, grad2, None


_footprint.register_autograd(_footprint_grad, setup_context=_save_map_size)
_subtraction.register_autograd(_subtraction_grad, setup_context=_save_map_size)
_subtraction2.register_autograd(_subtraction2_grad, setup_context=_save_map_size)


# --- aggregation

@custom_op('timm_san::aggregation', mutates_args=())
@outside_autocast
def _aggregation(x: torch.Tensor, weight: torch.Tensor, kernel_size: int) -> torch.Tensor:
    kernel = select_kernel('aggregation', x, backends=('triton', 'cpu'))
    if kernel == 'triton':
        return triton_kernels.aggregation(x, weight, kernel_size)
    if kernel == 'cpu':
        return cpu_aggregation.aggregation(x, weight.to(x.dtype), kernel_size)
    return reference.aggregation(x, weight.to(x.dtype), kernel_size)


@_aggregation.register_fake
def _(x, weight, kernel_size):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@custom_op('timm_san::aggregation_backward', mutates_args=())
@outside_autocast
def aggregation_backward(
        grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, kernel_size: int, input_grad: bool,
        weight_grad: bool) -> List[torch.Tensor]:
    """``[grad_x, grad_weight]``; one not asked for is an empty tensor."""
    if _uses_triton('aggregation_backward', grad):
        grad_x, grad_weight = triton_kernels.aggregation_backward(grad, x, weight, kernel_size, input_grad, weight_grad)
    else:
        grad = grad.contiguous()
        grad_x = reference.aggregation_input_grad(grad, weight, kernel_size) if input_grad else None
        grad_weight = reference.aggregation_weight_grad(x, grad, weight.shape[1], kernel_size) if weight_grad else None
    return [x.new_empty(0) if grad_x is None else grad_x, weight.new_empty(0) if grad_weight is None else grad_weight]


@aggregation_backward.register_fake
def _(grad, x, weight, kernel_size, input_grad, weight_grad):
    return [torch.empty_like(x) if input_grad else x.new_empty(0),
            torch.empty_like(weight) if weight_grad else weight.new_empty(0)]


def _aggregation_setup(ctx, inputs, output) -> None:
    x, weight, ctx.kernel_size = inputs
    ctx.save_for_backward(x, weight)


def _aggregation_grad(ctx, grad):
    x, weight = ctx.saved_tensors
    grad_x, grad_weight = aggregation_backward(
        grad, x, weight, ctx.kernel_size, ctx.needs_input_grad[0], ctx.needs_input_grad[1])
    return (grad_x if ctx.needs_input_grad[0] else None), (grad_weight if ctx.needs_input_grad[1] else None), None


_aggregation.register_autograd(_aggregation_grad, setup_context=_aggregation_setup)


# --- the public operators

def _check_map(name: str, x: torch.Tensor) -> None:
    if x.dim() != 4:
        raise ValueError(f'{name} needs a 4-D tensor (B, C, H, W), got {list(x.shape)}.')


def footprint(x: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Gather the ``k x k`` reflection-padded neighbourhood of every position.

    Args:
        x: Tensor of shape ``(B, C, H, W)``.
        kernel_size: Footprint side ``k`` (odd).

    Returns:
        Tensor of shape ``(B, C, k * k, H * W)``; ``[:, c, kh * k + kw, h * W + w]`` holds
        ``x[:, c, h + kh - k // 2, w + kw - k // 2]`` with reflection at the borders.
    """
    reference.check_kernel_size(kernel_size)
    _check_map('footprint', x)
    if inline_reference():
        return reference.footprint(x, kernel_size)
    return _footprint(x, kernel_size)


def subtraction(x: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Relation of each position with its footprint: ``x[centre] - x[neighbour]``.

    Args:
        x: Tensor of shape ``(B, C, H, W)``.
        kernel_size: Footprint side ``k`` (odd).

    Returns:
        Tensor of shape ``(B, C, k * k, H * W)``.
    """
    reference.check_kernel_size(kernel_size)
    _check_map('subtraction', x)
    if inline_reference():
        return reference.subtraction2(x, x, kernel_size)
    return _subtraction(x, kernel_size)


def subtraction2(x1: torch.Tensor, x2: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Relation of two maps: ``x1[centre] - x2[neighbour]`` over the footprint.

    Args:
        x1: Tensor of shape ``(B, C, H, W)``, read at the centre.
        x2: Tensor of the same shape, read over the footprint.
        kernel_size: Footprint side ``k`` (odd).

    Returns:
        Tensor of shape ``(B, C, k * k, H * W)``.
    """
    reference.check_kernel_size(kernel_size)
    if x1.dim() != 4 or x1.shape != x2.shape:
        raise ValueError(
            f'subtraction2 needs two 4-D tensors of one shape (B, C, H, W), got {list(x1.shape)} and '
            f'{list(x2.shape)}.')
    if inline_reference():
        return reference.subtraction2(x1, x2, kernel_size)
    return _subtraction2(x1, x2, kernel_size)


def aggregation(x: torch.Tensor, weight: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Weighted sum over the footprint, weight channels shared across ``C / Cw`` interleaved groups.

    ``out[b, c, h, w] = sum_k weight[b, c % Cw, k, h * W + w] * x[b, c, neighbour k of (h, w)]``

    Args:
        x: Tensor of shape ``(B, C, H, W)``.
        weight: Tensor of shape ``(B, Cw, k * k, H * W)`` with ``C % Cw == 0``.
        kernel_size: Footprint side ``k`` (odd).

    Returns:
        Tensor of shape ``(B, C, H, W)``.
    """
    reference.check_kernel_size(kernel_size)
    if x.dim() != 4 or weight.dim() != 4:
        raise ValueError(
            f'aggregation needs x (B, C, H, W) and weight (B, Cw, k*k, H*W), got {list(x.shape)} and '
            f'{list(weight.shape)}.')
    batch, channels, height, width = x.shape
    weight_channels = weight.shape[1]
    num_offsets = kernel_size * kernel_size
    if (weight.shape[0] != batch or weight_channels == 0 or channels % weight_channels != 0
            or weight.shape[2] != num_offsets or weight.shape[3] != height * width):
        raise ValueError(
            f'aggregation weight must be (B={batch}, Cw, {num_offsets}, {height * width}) with {channels} '
            f'divisible by Cw, got {list(weight.shape)}.')
    if inline_reference():
        return reference.aggregation(x, weight, kernel_size)
    return _aggregation(x, weight, kernel_size)


@register_notrace_function
def position_grid(x: torch.Tensor) -> torch.Tensor:
    """Coordinate grid of the official position encoding, for the spatial size of ``x``.

    Args:
        x: Tensor of shape ``(B, C, H, W)``; only its size, dtype and device are used.

    Returns:
        Tensor of shape ``(1, 2, H, W)``: channel 0 is ``linspace(-1, 1, W)`` along the width,
        channel 1 is ``linspace(-1, 1, H)`` along the height.
    """
    return reference.position_grid(x)

