""" Fused inference operators of SAN: the attention weights without k x k-fold relation buffers

In eval mode every BatchNorm of SAM's weight mapping is a fixed per-channel affine map, so the mapping can be
evaluated a few footprint offsets (and samples) at a time: the relation of a chunk is built straight from a
strided view of the padded map, pushed through both 1x1 layers while it is still in cache, and only the
``(B, Cw, k * k, H * W)`` weights are written out. The unfused path materialises the ``(B, C_rel, k * k, H * W)``
relation and every intermediate of the mapping.

The results equal the unfused operators up to float rounding (the affine maps are folded into the
neighbouring layers and the first layer's sum is accumulated chunk by chunk). Everything here is made of
differentiable PyTorch ops, so gradients through an eval-mode model still work.
"""
from typing import List, Optional, Tuple

import torch
from timm.layers import register_notrace_function

from .ops import footprint_view, reflect_pad

__all__ = ['pairwise_weights', 'patchwise_weights', 'fold_mapping', 'offset_chunks']

# elements of one chunk's relation buffer: small enough to stay in a core's L2 cache
_CHUNK_ELEMENTS = 1 << 18


def offset_chunks(
        batch: int, planes: int, kernel_size: int, spatial: int, chunk_elements: int = _CHUNK_ELEMENTS,
) -> Tuple[int, int]:
    """How many samples and footprint rows one chunk of a ``(B, planes, k, k, H * W)`` relation holds.

    Args:
        batch: Batch size ``B``.
        planes: Relation channels.
        kernel_size: Footprint side ``k``.
        spatial: ``H * W``.
        chunk_elements: Elements one chunk may hold (a default argument: TorchScript reads no global ints).

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


def _bn_affine(
        weight: Optional[torch.Tensor],
        bias: Optional[torch.Tensor],
        running_mean: torch.Tensor,
        running_var: torch.Tensor,
        eps: float,
) -> Tuple[torch.Tensor, torch.Tensor]:
    scale = torch.rsqrt(running_var + eps)
    if weight is not None:
        scale = scale * weight
    shift = -running_mean * scale
    if bias is not None:
        shift = shift + bias
    return scale, shift


def fold_mapping(mapping: List[Optional[torch.Tensor]], eps1: float, eps2: float) -> List[torch.Tensor]:
    """The eval-mode weight mapping BN, ReLU, 1x1 conv, BN, ReLU, 1x1 conv as affine map and two folded layers.

    Args:
        mapping: ``[bn1.weight, bn1.bias, bn1.running_mean, bn1.running_var, conv1.weight, conv1.bias,
            bn2.weight, bn2.bias, bn2.running_mean, bn2.running_var, conv2.weight, conv2.bias]``, the raw module
            tensors (so FX traces them as attributes of the model, not as constants of the trace).
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
    scale, shift = _bn_affine(mapping[0], mapping[1], bn1_mean, bn1_var, eps1)
    scale2, shift2 = _bn_affine(mapping[6], mapping[7], bn2_mean, bn2_var, eps2)
    weight1 = conv1_weight.reshape(conv1_weight.shape[0], -1) * scale2.view(-1, 1)
    conv1_bias = mapping[5]
    bias1 = shift2 if conv1_bias is None else shift2 + conv1_bias * scale2
    weight2 = conv2_weight.reshape(conv2_weight.shape[0], -1)
    conv2_bias = mapping[11]
    bias2 = weight2.new_zeros(weight2.shape[0]) if conv2_bias is None else conv2_bias
    return [scale, shift, weight1, bias1, weight2, bias2]


def _bmm(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``weight @ x[b]`` for every sample of ``x`` ``(B, K, N)``, as one batched matmul.

    ``torch.matmul`` of a matrix with a batch folds the batch into a transposed ``(B * N, K)`` copy and returns a
    transposed result that is copied again; a broadcast (stride 0) weight in ``bmm`` reads each sample in place.
    """
    return torch.bmm(weight.expand(x.shape[0], -1, -1), x)


def _needs_grad(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _relation_chunk(
        centre: torch.Tensor, windows: torch.Tensor, scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``relu(centre - windows)``, or ``relu(centre + windows * scale)`` given a scale, in contiguous layout.

    Broadcasting against the overlapping window view would otherwise pick a permuted output layout. Under autograd
    and torch.compile (whose out= handling keeps that layout) the result is made contiguous instead.
    """
    if torch.compiler.is_compiling() or _needs_grad(centre, windows) or (scale is not None and _needs_grad(scale)):
        relation = centre - windows if scale is None else torch.addcmul(centre, windows, scale)
        return relation.contiguous().relu_()
    shape = torch.broadcast_shapes(centre.shape, windows.shape)
    relation = torch.empty(shape, dtype=windows.dtype, device=windows.device)
    if scale is None:
        torch.sub(centre, windows, out=relation)
    else:
        torch.addcmul(centre, windows, scale, out=relation)
    return relation.relu_()


@register_notrace_function
def pairwise_weights(
        x1: torch.Tensor,
        x2: torch.Tensor,
        position: torch.Tensor,
        mapping: List[Optional[torch.Tensor]],
        eps1: float,
        eps2: float,
        kernel_size: int,
) -> torch.Tensor:
    """Softmax-normalised pairwise attention weights, evaluated footprint row by row.

    ``softmax_k(W2 relu(W1 relu(scale * [x1 - x2[nbr]; p - p[nbr]] + shift) + b1) + b2)``

    Args:
        x1: Centre map ``(B, R, H, W)`` (conv1 output).
        x2: Neighbour map ``(B, R, H, W)`` (conv2 output).
        position: Position encoding ``(1, 2, H, W)`` (conv_p output).
        mapping: The eval-mode weight mapping's tensors, as ``fold_mapping`` takes them (``R + 2`` input
            channels, ``R`` hidden, ``Cw`` output).
        eps1: First BatchNorm's epsilon.
        eps2: Second BatchNorm's epsilon.
        kernel_size: Footprint side ``k`` (odd).

    Returns:
        Weights of shape ``(B, Cw, k * k, H * W)``, summing to one over the footprint.
    """
    scale, shift, weight1, bias1, weight2, bias2 = fold_mapping(mapping, eps1, eps2)
    batch, planes, height, width = x1.shape
    k, pad, spatial = kernel_size, kernel_size // 2, height * width
    weight_planes = weight2.shape[0]
    # BN(x1[c] - x2[n]) = (scale * x1 + shift)[c] - (scale * x2)[n]: the affine map costs H * W, not k * k * H * W
    rel_scale, rel_shift = scale[:planes].view(1, planes, 1, 1), shift[:planes].view(1, planes, 1, 1)
    centre = (x1 * rel_scale + rel_shift).reshape(batch, planes, 1, 1, height, width)
    windows = footprint_view(reflect_pad(x2 * rel_scale, pad), k)
    # the position relation is the same for every sample: its share of the first layer is computed once
    pos_scale, pos_shift = scale[planes:].view(1, 2, 1, 1), shift[planes:].view(1, 2, 1, 1)
    pos_centre = (position * pos_scale + pos_shift).reshape(1, 2, 1, 1, height, width)
    pos_relation = torch.relu(pos_centre - footprint_view(reflect_pad(position * pos_scale, pad), k))
    pos_hidden = torch.addmm(bias1.view(-1, 1), weight1[:, planes:], pos_relation.reshape(2, k * k * spatial))
    pos_hidden = pos_hidden.view(planes, k, k * spatial)
    weight1_rel = weight1[:, :planes].contiguous()

    samples, rows = offset_chunks(batch, planes, k, spatial)
    logits = x1.new_empty((batch, weight_planes, k, k * spatial))
    for start in range(0, batch, samples):
        end = min(start + samples, batch)
        for row in range(0, k, rows):
            row_end = min(row + rows, k)
            num = end - start
            relation = _relation_chunk(centre[start:end], windows[start:end, :, row:row_end])
            hidden = _bmm(weight1_rel, relation.reshape(num, planes, -1))
            hidden = hidden.view(num, planes, row_end - row, k * spatial).add_(pos_hidden[:, row:row_end]).relu_()
            chunk = _bmm(weight2, hidden.view(num, planes, -1)).add_(bias2.view(1, -1, 1))
            logits[start:end, :, row:row_end] = chunk.view(num, weight_planes, row_end - row, k * spatial)
    logits = logits.view(batch, weight_planes, k * k, spatial)
    return torch.softmax(logits, dim=2)


@register_notrace_function
def patchwise_weights(
        x1: torch.Tensor,
        x2: torch.Tensor,
        mapping: List[Optional[torch.Tensor]],
        eps1: float,
        eps2: float,
        kernel_size: int,
) -> torch.Tensor:
    """Patchwise attention weights, the first layer's sum over the footprint accumulated row by row.

    ``W2 relu(W1 relu(scale * [x1; x2 over the footprint] + shift) + b1) + b2``

    Args:
        x1: Centre map ``(B, R, H, W)`` (conv1 output).
        x2: Footprint map ``(B, R, H, W)`` (conv2 output).
        mapping: The eval-mode weight mapping's tensors, as ``fold_mapping`` takes them (``R * (k * k + 1)``
            input channels, the footprint's channel-major (``c * k * k + offset``) after the ``R`` centre
            channels; ``Cw`` hidden; ``k * k * Cw`` output).
        eps1: First BatchNorm's epsilon.
        eps2: Second BatchNorm's epsilon.
        kernel_size: Footprint side ``k`` (odd).

    Returns:
        Weights of shape ``(B, Cw, k * k, H * W)``.
    """
    scale, shift, weight1, bias1, weight2, bias2 = fold_mapping(mapping, eps1, eps2)
    batch, planes, height, width = x1.shape
    k, spatial = kernel_size, height * width
    weight_planes = weight1.shape[0]
    centre = torch.relu(x1 * scale[:planes].view(1, planes, 1, 1) + shift[:planes].view(1, planes, 1, 1))
    hidden = _bmm(weight1[:, :planes], centre.reshape(batch, planes, spatial)).add_(bias1.view(1, -1, 1))

    windows = footprint_view(reflect_pad(x2, k // 2), k)
    foot_scale = scale[planes:].view(1, planes, k, k, 1, 1)
    foot_shift = shift[planes:].view(1, planes, k, k, 1, 1)
    foot_weight = weight1[:, planes:].reshape(weight_planes, planes, k, k)
    samples, rows = offset_chunks(batch, planes, k, spatial)
    row_weights: List[torch.Tensor] = []
    for row in range(0, k, rows):
        row_weights.append(foot_weight[:, :, row:min(row + rows, k)].reshape(weight_planes, -1))
    chunks: List[torch.Tensor] = []
    for start in range(0, batch, samples):
        end = min(start + samples, batch)
        acc = hidden[start:end]
        for index, row in enumerate(range(0, k, rows)):
            row_end = min(row + rows, k)
            relation = _relation_chunk(
                foot_shift[:, :, row:row_end], windows[start:end, :, row:row_end], foot_scale[:, :, row:row_end])
            relation = relation.reshape(end - start, -1, spatial)
            acc = acc + _bmm(row_weights[index], relation)
        chunks.append(acc)
    hidden = torch.cat(chunks, dim=0).relu_() if len(chunks) > 1 else chunks[0].relu_()
    weights = _bmm(weight2, hidden).add_(bias2.view(1, -1, 1))
    return weights.view(batch, weight_planes, k * k, spatial)
