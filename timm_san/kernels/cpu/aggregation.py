""" The aggregation on CPU: a few samples at a time, accumulated in place while they stay in cache """
import torch

from ..reference import reflect_pad

__all__ = ['aggregation']

# elements of the accumulator the aggregation loop keeps in flight: about a core's L2 cache
_CACHE_ELEMENTS = 1 << 18


def aggregation(x: torch.Tensor, weight: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """``reference.aggregation`` without autograd: ``k * k`` in-place multiply-adds per chunk of samples.

    Args:
        x: Tensor of shape ``(B, C, H, W)``.
        weight: Tensor of shape ``(B, Cw, k * k, H * W)`` with ``C % Cw == 0``.
        kernel_size: Footprint side ``k`` (odd).

    Returns:
        Tensor of shape ``(B, C, H, W)``.
    """
    batch, channels, height, width = x.shape
    weight_channels = weight.shape[1]
    groups = channels // weight_channels
    padded = reflect_pad(x, kernel_size // 2).reshape(
        batch, groups, weight_channels, height + kernel_size - 1, width + kernel_size - 1)
    weight = weight.reshape(batch, 1, weight_channels, kernel_size * kernel_size, height, width)
    out = torch.empty((batch, groups, weight_channels, height, width), dtype=x.dtype, device=x.device)
    step = max(1, _CACHE_ELEMENTS // max(1, channels * height * width))
    for start in range(0, batch, step):
        end = min(start + step, batch)
        acc = out[start:end]
        for kh in range(kernel_size):
            for kw in range(kernel_size):
                window = padded[start:end, :, :, kh:kh + height, kw:kw + width]
                offset_weight = weight[start:end, :, :, kh * kernel_size + kw]
                if kh == 0 and kw == 0:
                    torch.mul(window, offset_weight, out=acc)
                else:
                    acc.addcmul_(window, offset_weight)
    return out.reshape(batch, channels, height, width)
