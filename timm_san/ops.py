""" Self-attention operators of SAN (footprint gathering, relations, aggregation, position grid)

The arithmetic of the official CUDA kernels of "Exploring Self-attention for Image Recognition"
(Zhao, Jia, Koltun, CVPR 2020, https://arxiv.org/abs/2004.13621), in plain PyTorch so it runs on every
device and dtype, scripts with TorchScript and traces with FX (the functions are registered as FX leaves).

Layout conventions follow the official kernels:
    * a footprint tensor is ``(B, C, k * k, H * W)``, offsets in row-major order (``kh * k + kw``);
    * aggregation weights are ``(B, Cw, k * k, H * W)`` and output channel ``c`` uses weight channel
      ``c % Cw`` (channels share weights interleaved, not in contiguous blocks).

Padding is reflection of width ``(k - 1) // 2``. The official kernels reflect once, which is only defined
while the pad is smaller than the map side; on smaller maps they read out of bounds. Here the reflection is
repeated (the map is mirrored back and forth without repeating its edge, period ``2 * (n - 1)``; a side of
one pixel repeats that pixel). Wherever the official kernels are defined the two agree exactly.

Every model-level call goes through these functions, so a faster kernel replaces one of them without
touching the network.
"""
from typing import List

import torch
import torch.nn.functional as F
from timm.layers import register_notrace_function

__all__ = [
    'reflect_index', 'reflect_pad', 'footprint', 'subtraction', 'subtraction2', 'aggregation', 'position_grid',
]


def _check_kernel_size(kernel_size: int) -> None:
    if kernel_size < 1 or kernel_size % 2 != 1:
        raise ValueError(f'kernel_size must be a positive odd number, got {kernel_size}.')


def reflect_index(size: int, pad: int, device: torch.device) -> torch.Tensor:
    """Source index of each position of a side of ``size`` padded by ``pad`` on both ends.

    Args:
        size: Length of the side.
        pad: Padding on each end.
        device: Device of the returned index.

    Returns:
        int64 tensor of length ``size + 2 * pad``, values in ``[0, size)``.
    """
    pos = torch.arange(-pad, size + pad, device=device)
    if size == 1:
        return torch.zeros_like(pos)
    period = 2 * (size - 1)
    pos = torch.remainder(pos, period)
    return torch.where(pos < size, pos, period - pos)


@register_notrace_function
def reflect_pad(x: torch.Tensor, pad: int) -> torch.Tensor:
    """Reflection-pad the last two dims of ``x`` by ``pad``, reflecting repeatedly where a side is too short.

    Args:
        x: Tensor of shape ``(..., H, W)``.
        pad: Padding on each side.

    Returns:
        Tensor of shape ``(..., H + 2 * pad, W + 2 * pad)``.
    """
    if pad == 0:
        return x
    height, width = x.shape[-2], x.shape[-1]
    if pad < height and pad < width:
        # single reflection: the case the official kernels define, and the fast path
        return F.pad(x, (pad, pad, pad, pad), mode='reflect')
    x = x.index_select(-2, reflect_index(height, pad, x.device))
    return x.index_select(-1, reflect_index(width, pad, x.device))


@register_notrace_function
def footprint(x: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Gather the ``k x k`` reflection-padded neighbourhood of every position.

    Args:
        x: Tensor of shape ``(B, C, H, W)``.
        kernel_size: Footprint side ``k`` (odd).

    Returns:
        Tensor of shape ``(B, C, k * k, H * W)``; ``[:, c, kh * k + kw, h * W + w]`` holds
        ``x[:, c, h + kh - k // 2, w + kw - k // 2]`` with reflection at the borders.
    """
    _check_kernel_size(kernel_size)
    batch, channels, height, width = x.shape
    padded = reflect_pad(x, kernel_size // 2)
    views: List[torch.Tensor] = []
    for kh in range(kernel_size):
        for kw in range(kernel_size):
            views.append(padded[:, :, kh:kh + height, kw:kw + width])
    return torch.stack(views, dim=2).reshape(batch, channels, kernel_size * kernel_size, height * width)


@register_notrace_function
def subtraction(x: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Relation of each position with its footprint: ``x[centre] - x[neighbour]``.

    Args:
        x: Tensor of shape ``(B, C, H, W)``.
        kernel_size: Footprint side ``k`` (odd).

    Returns:
        Tensor of shape ``(B, C, k * k, H * W)``.
    """
    return subtraction2(x, x, kernel_size)


@register_notrace_function
def subtraction2(x1: torch.Tensor, x2: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Relation of two maps: ``x1[centre] - x2[neighbour]`` over the footprint.

    Args:
        x1: Tensor of shape ``(B, C, H, W)``, read at the centre.
        x2: Tensor of the same shape, read over the footprint.
        kernel_size: Footprint side ``k`` (odd).

    Returns:
        Tensor of shape ``(B, C, k * k, H * W)``.
    """
    if x1.dim() != 4 or x1.shape != x2.shape:
        raise ValueError(
            f'subtraction2 needs two 4-D tensors of one shape (B, C, H, W), got {list(x1.shape)} and '
            f'{list(x2.shape)}.')
    batch, channels, height, width = x1.shape
    return x1.reshape(batch, channels, 1, height * width) - footprint(x2, kernel_size)


@register_notrace_function
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
    _check_kernel_size(kernel_size)
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
    groups = channels // weight_channels
    # channel c = g * Cw + s uses weight channel s: a reshape, no index copy
    padded = reflect_pad(x, kernel_size // 2).reshape(
        batch, groups, weight_channels, height + kernel_size - 1, width + kernel_size - 1)
    weight = weight.reshape(batch, 1, weight_channels, num_offsets, height, width)
    out = torch.zeros((batch, groups, weight_channels, height, width), dtype=x.dtype, device=x.device)
    for kh in range(kernel_size):
        for kw in range(kernel_size):
            out = out + padded[..., kh:kh + height, kw:kw + width] * weight[:, :, :, kh * kernel_size + kw]
    return out.reshape(batch, channels, height, width)


@register_notrace_function
def position_grid(x: torch.Tensor) -> torch.Tensor:
    """Coordinate grid of the official position encoding, for the spatial size of ``x``.

    Args:
        x: Tensor of shape ``(B, C, H, W)``; only its size, dtype and device are used.

    Returns:
        Tensor of shape ``(1, 2, H, W)``: channel 0 is ``linspace(-1, 1, W)`` along the width,
        channel 1 is ``linspace(-1, 1, H)`` along the height.
    """
    height, width = x.shape[-2], x.shape[-1]
    loc_w = torch.linspace(-1.0, 1.0, width, dtype=x.dtype, device=x.device).view(1, width).expand(height, width)
    loc_h = torch.linspace(-1.0, 1.0, height, dtype=x.dtype, device=x.device).view(height, 1).expand(height, width)
    return torch.stack([loc_w, loc_h], dim=0).unsqueeze(0)
