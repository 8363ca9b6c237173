""" Helpers shared by SAN's kernels: BatchNorm as an affine map, the eval mapping folded, how much of a relation one
chunk holds, the training batch check """
from typing import List, Optional, Tuple

import torch

__all__ = ['bn_scale_shift', 'fold_mapping', 'offset_chunks', 'input_moments', 'check_batch_size', 'CHUNK_ELEMENTS']

# elements of one chunk's relation buffer: small enough to stay in a core's L2 cache
CHUNK_ELEMENTS = 1 << 18


def bn_scale_shift(
        weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], mean: torch.Tensor, invstd: torch.Tensor,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(scale, shift)`` with ``batch_norm(x) == x * scale + shift`` per channel.

    Args:
        weight: The norm's weight, or None (not affine).
        bias: The norm's bias, or None.
        mean: The mean it subtracts (running or batch statistics).
        invstd: ``1 / sqrt(var + eps)`` of the variance it divides by.
    """
    scale = invstd if weight is None else invstd * weight
    shift = -mean * scale
    if bias is not None:
        shift = shift + bias
    return scale, shift


def fold_mapping(mapping: List[Optional[torch.Tensor]], eps1: float, eps2: float) -> List[torch.Tensor]:
    """The eval-mode weight mapping BN, ReLU, 1x1 conv, BN, ReLU, 1x1 conv as affine map and two folded layers.

    Args:
        mapping: ``[bn1.weight, bn1.bias, bn1.running_mean, bn1.running_var, conv1.weight, conv1.bias,
            bn2.weight, bn2.bias, bn2.running_mean, bn2.running_var, conv2.weight, conv2.bias]``.
        eps1: First BatchNorm's epsilon.
        eps2: Second BatchNorm's epsilon.

    Returns:
        ``[scale, shift, weight1, bias1, weight2, bias2]``: ``bn1(x) == x * scale + shift``, the second BatchNorm
        folded into ``weight1`` / ``bias1``, ``weight2`` / ``bias2`` the last layer as matrices.
    """
    bn1_mean, bn1_var, conv1_weight = mapping[2], mapping[3], mapping[4]
    bn2_mean, bn2_var, conv2_weight = mapping[8], mapping[9], mapping[10]
    assert bn1_mean is not None and bn1_var is not None and conv1_weight is not None
    assert bn2_mean is not None and bn2_var is not None and conv2_weight is not None
    scale, shift = bn_scale_shift(mapping[0], mapping[1], bn1_mean, torch.rsqrt(bn1_var + eps1))
    scale2, shift2 = bn_scale_shift(mapping[6], mapping[7], bn2_mean, torch.rsqrt(bn2_var + eps2))
    weight1 = conv1_weight.reshape(conv1_weight.shape[0], -1) * scale2.view(-1, 1)
    conv1_bias = mapping[5]
    bias1 = shift2 if conv1_bias is None else shift2 + conv1_bias * scale2
    weight2 = conv2_weight.reshape(conv2_weight.shape[0], -1)
    conv2_bias = mapping[11]
    bias2 = weight2.new_zeros(weight2.shape[0]) if conv2_bias is None else conv2_bias
    return [scale, shift, weight1, bias1, weight2, bias2]


def offset_chunks(
        batch: int, planes: int, kernel_size: int, spatial: int, chunk_elements: int = CHUNK_ELEMENTS,
) -> Tuple[int, int]:
    """How many samples and footprint rows one chunk of a ``(B, planes, k, k, H * W)`` relation holds.

    Args:
        batch: Batch size ``B``.
        planes: Relation channels.
        kernel_size: Footprint side ``k``.
        spatial: ``H * W``.
        chunk_elements: Elements one chunk may hold.

    Returns:
        ``(samples, rows)``: whole footprint rows per chunk, and more than one sample only once a chunk
        holds every row.
    """
    row = max(1, planes * kernel_size * spatial)
    rows = max(1, min(kernel_size, chunk_elements // row))
    samples = 1
    if rows == kernel_size:
        samples = max(1, min(batch, chunk_elements // (row * kernel_size)))
    return samples, rows


def input_moments(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean ``(C,)`` and biased covariance ``(C, C)`` of ``x`` over batch and pixels.

    Reductions rather than a matmul over the pixels: their pairwise summation keeps float32 sums of millions of
    pixels accurate, as BatchNorm's own statistics are.
    """
    mean = x.mean(dim=(0, 2, 3))
    centred = x - mean.view(1, -1, 1, 1)
    covariance = (centred.unsqueeze(1) * centred.unsqueeze(2)).mean(dim=(0, 3, 4))
    return mean, covariance


def check_batch_size(x: torch.Tensor, offsets: int) -> None:
    """Refuse a training batch whose norms would see one value per channel, as BatchNorm refuses it.

    Args:
        x: SAM's input ``(B, C, H, W)``.
        offsets: Values per pixel a norm of the mapping sees (``k * k`` for pairwise, 1 for patchwise).
    """
    if x.shape[0] * offsets * x.shape[2] * x.shape[3] == 1:
        raise ValueError(f'Expected more than 1 value per channel when training, got input size {list(x.shape)}')
