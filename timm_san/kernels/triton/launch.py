""" Triton launchers of SAN's operators: one kernel per operator and direction

One launch per operator instead of the ``k * k`` shifted-view passes of the reference, which on a GPU are
``k * k`` launches re-reading the accumulator each time. The arithmetic and its results are those of
``timm_san.kernels.reference`` (repeated reflection on small maps, weight channel ``c % Cw``, output dtypes),
with sums in float32 (float64 for float64 tensors), rounded once.

The launchers take any device: under Triton's interpreter (``TRITON_INTERPRET=1`` before Triton is first
imported) they run on CPU tensors, which is how the tests check the kernels without a GPU. Which calls reach them
is decided by ``timm_san.ops.dispatch.select_kernel``.
"""
import contextlib
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from . import kernels

__all__ = ['footprint', 'subtraction2', 'aggregation', 'footprint_backward', 'offset_sum', 'aggregation_backward']

# most positions per program; elements per program where a program also takes several rows or channel groups
_BLOCK = 256
_TILE = 1024
_MAX_GROUP_BLOCK = 16


def _acc(*tensors: torch.Tensor) -> torch.dtype:
    """Dtype of the sums: float64 if any operand is float64, float32 otherwise."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _tl(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _geometry(height: int, width: int, pad: int) -> Tuple[int, int, bool]:
    """Reflection periods of both sides, and whether a side is short enough to need repeated reflection."""
    return max(2 * (height - 1), 1), max(2 * (width - 1), 1), pad >= height or pad >= width


def _block(size: int, most: int = _BLOCK) -> int:
    return min(most, max(16, triton.next_power_of_2(size)))


def _row_grid(rows: int, spatial: int) -> Tuple[Tuple[int], int, int]:
    """Grid, rows and positions per program of the kernels that tile ``(rows, positions)``."""
    block = _block(spatial)
    block_rows = min(triton.next_power_of_2(rows), max(1, _TILE // block))
    return (triton.cdiv(rows, block_rows) * triton.cdiv(spatial, block),), block_rows, block


def _group_blocks(groups: int, spatial: int) -> Tuple[int, int]:
    """Channels and positions of one program of the channel-blocked kernels."""
    block_groups = min(_MAX_GROUP_BLOCK, triton.next_power_of_2(groups))
    return block_groups, _block(spatial, max(32, _TILE // block_groups))


def _device(t: torch.Tensor):
    # Triton launches on the current device: make it the tensors' one
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def footprint(x: torch.Tensor, kernel_size: int, x1: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``ops.footprint(x, k)``, or with ``x1`` the relation ``ops.subtraction2(x1, x, k)``.

    Args:
        x: Map ``(B, C, H, W)`` read over the footprint.
        kernel_size: Footprint side ``k`` (odd).
        x1: Optional map of the same shape read at the centre.

    Returns:
        Tensor ``(B, C, k * k, H * W)`` of ``x``'s dtype (promoted with ``x1``'s).
    """
    relation = x1 is not None
    batch, channels, height, width = x.shape
    x = x.contiguous()
    x1 = x1.contiguous() if relation else x
    dtype = torch.promote_types(x1.dtype, x.dtype)
    out = x.new_empty((batch, channels, kernel_size * kernel_size, height * width), dtype=dtype)
    if out.numel() == 0:
        return out
    period_h, period_w, repeat = _geometry(height, width, kernel_size // 2)
    grid, block_rows, block = _row_grid(batch * channels, height * width)
    with _device(x):
        kernels.footprint_kernel[grid](
            x1, x, out, batch * channels, height, width, period_h, period_w, K=kernel_size, HAS_X1=relation,
            REPEAT=repeat, ACC=_tl(_acc(x1, x)), BLOCK_R=block_rows, BLOCK=block, num_warps=4)
    return out


def subtraction2(x1: torch.Tensor, x2: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """``ops.subtraction2``: ``x1[centre] - x2[neighbour]`` over the footprint, ``(B, C, k * k, H * W)``."""
    return footprint(x2, kernel_size, x1=x1)


def aggregation(x: torch.Tensor, weight: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """``ops.aggregation``: weighted sum over the footprint, ``(B, C, H, W)`` of ``x``'s dtype.

    Args:
        x: Map ``(B, C, H, W)``.
        weight: Weights ``(B, Cw, k * k, H * W)``, ``C % Cw == 0``; may have another dtype than ``x``.
        kernel_size: Footprint side ``k`` (odd).
    """
    batch, channels, height, width = x.shape
    weight_channels = weight.shape[1]
    x, weight = x.contiguous(), weight.contiguous()
    out = torch.empty_like(x)
    if out.numel() == 0:
        return out
    period_h, period_w, repeat = _geometry(height, width, kernel_size // 2)
    groups = channels // weight_channels
    block_groups, block = _group_blocks(groups, height * width)
    grid = (batch * weight_channels * triton.cdiv(groups, block_groups) * triton.cdiv(height * width, block),)
    with _device(x):
        kernels.aggregation_kernel[grid](
            x, weight, out, channels, weight_channels, height, width, period_h, period_w, K=kernel_size,
            REPEAT=repeat, ACC=_tl(_acc(x, weight)), BLOCK_G=block_groups, BLOCK=block, num_warps=4)
    return out


def _fold(padded: torch.Tensor, height: int, width: int, pad: int, dtype: torch.dtype) -> torch.Tensor:
    """``ops.reflect_pad_backward`` of a ``(B, C, H + 2 * pad, W + 2 * pad)`` gradient, cast to ``dtype``."""
    batch, channels = padded.shape[0], padded.shape[1]
    out = padded.new_empty((batch, channels, height, width), dtype=dtype)
    period_h, period_w, repeat = _geometry(height, width, pad)
    grid, block_rows, block = _row_grid(batch * channels, height * width)
    kernels.fold_kernel[grid](
        padded, out, batch * channels, height, width, period_h, period_w, PAD=pad, REPEAT=repeat,
        ACC=_tl(padded.dtype), BLOCK_R=block_rows, BLOCK=block, num_warps=4)
    return out


def footprint_backward(
        grad: torch.Tensor,
        height: int,
        width: int,
        kernel_size: int,
        dtype: torch.dtype,
        negate: bool = False,
        centre: bool = False,
) -> torch.Tensor:
    """Gradient of ``footprint`` with respect to its map: gather onto the padded grid, then fold the padding.

    Args:
        grad: Gradient ``(B, C, k * k, H * W)`` of the footprint (or relation).
        height: Map height ``H``.
        width: Map width ``W``.
        kernel_size: Footprint side ``k``.
        dtype: Dtype of the returned gradient (the map's).
        negate: Negate it (the map read over the footprint of a relation).
        centre: Add the sum over the footprint at each position (the map of ``subtraction``, read at both ends).

    Returns:
        Tensor ``(B, C, H, W)``.
    """
    batch, channels = grad.shape[0], grad.shape[1]
    pad = kernel_size // 2
    grad = grad.contiguous()
    padded = grad.new_empty((batch, channels, height + 2 * pad, width + 2 * pad), dtype=_acc(grad))
    if padded.numel() == 0:
        return grad.new_zeros((batch, channels, height, width), dtype=dtype)
    grid, block_rows, block = _row_grid(batch * channels, padded.shape[2] * padded.shape[3])
    with _device(grad):
        kernels.footprint_grad_kernel[grid](
            grad, padded, batch * channels, height, width, K=kernel_size, NEGATE=negate, CENTRE=centre,
            ACC=_tl(padded.dtype), BLOCK_R=block_rows, BLOCK=block, num_warps=4)
        return _fold(padded, height, width, pad, dtype)


def offset_sum(grad: torch.Tensor, height: int, width: int, dtype: torch.dtype) -> torch.Tensor:
    """``grad.sum(2)`` of a ``(B, C, k * k, H * W)`` gradient as a ``(B, C, H, W)`` map of ``dtype``."""
    batch, channels, num_offsets = grad.shape[0], grad.shape[1], grad.shape[2]
    grad = grad.contiguous()
    out = grad.new_empty((batch, channels, height, width), dtype=dtype)
    if out.numel() == 0:
        return out.zero_()
    grid, block_rows, block = _row_grid(batch * channels, height * width)
    with _device(grad):
        kernels.offset_sum_kernel[grid](
            grad, out, batch * channels, height * width, NUM_OFFSETS=num_offsets, ACC=_tl(_acc(grad)),
            BLOCK_R=block_rows, BLOCK=block, num_warps=4)
    return out


def aggregation_backward(
        grad: torch.Tensor,
        x: torch.Tensor,
        weight: torch.Tensor,
        kernel_size: int,
        need_input: bool = True,
        need_weight: bool = True,
) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Gradients of ``aggregation`` with respect to ``x`` and ``weight``, in their dtypes.

    Args:
        grad: Gradient ``(B, C, H, W)`` of the output.
        x: The map aggregated.
        weight: The weights ``(B, Cw, k * k, H * W)``.
        kernel_size: Footprint side ``k``.
        need_input: Compute the gradient of ``x``.
        need_weight: Compute the gradient of ``weight``.

    Returns:
        ``(grad_x, grad_weight)``, None where not asked for.
    """
    batch, channels, height, width = x.shape
    weight_channels = weight.shape[1]
    groups = channels // weight_channels
    pad = kernel_size // 2
    grad, x, weight = grad.contiguous(), x.contiguous(), weight.contiguous()
    acc = _acc(grad, x, weight)
    grad_x = grad_weight = None
    with _device(x):
        if need_input:
            # sums of the padded grid stay in the accumulation dtype until the fold has added them up
            padded = grad.new_empty((batch, channels, height + 2 * pad, width + 2 * pad), dtype=acc)
            if padded.numel() == 0:
                grad_x = torch.zeros_like(x)
            else:
                spatial = padded.shape[2] * padded.shape[3]
                block_groups, block = _group_blocks(groups, spatial)
                grid = (batch * weight_channels * triton.cdiv(groups, block_groups) * triton.cdiv(spatial, block),)
                kernels.aggregation_input_grad_kernel[grid](
                    grad, weight, padded, channels, weight_channels, height, width, K=kernel_size, ACC=_tl(acc),
                    BLOCK_G=block_groups, BLOCK=block, num_warps=4)
                grad_x = _fold(padded, height, width, pad, x.dtype)
        if need_weight:
            grad_weight = torch.empty_like(weight)
            if grad_weight.numel() != 0:
                period_h, period_w, repeat = _geometry(height, width, pad)
                block_groups, block = _group_blocks(groups, height * width)
                grid = (batch * weight_channels * triton.cdiv(height * width, block),)
                kernels.aggregation_weight_grad_kernel[grid](
                    x, grad, grad_weight, channels, weight_channels, height, width, period_h, period_w,
                    K=kernel_size, REPEAT=repeat, ACC=_tl(acc), BLOCK_G=block_groups, BLOCK=block, num_warps=4)
    return grad_x, grad_weight
