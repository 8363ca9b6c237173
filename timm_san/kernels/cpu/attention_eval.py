""" SAN's attention in eval mode on CPU: weights without k x k-fold relation buffers, a few samples at a time

In eval mode every BatchNorm of SAM's weight mapping is a fixed per-channel affine map, so the mapping can be
evaluated a few footprint rows (and samples) at a time: the relation of a chunk is built straight from a strided
view of the padded map, pushed through both 1x1 layers while it is still in cache, and only the
``(B, Cw, k * k, H * W)`` weights are written out, into one buffer the sample chunks share (fresh megabyte
tensors per chunk would each fault their pages in again). The reference materialises the
``(B, C_rel, k * k, H * W)`` relation and every intermediate of the mapping.

The results equal the reference up to float rounding (the affine maps are folded into the neighbouring layers
and the first layer's sum is accumulated chunk by chunk). These kernels run inside the operators of
``timm_san.ops``, below autograd: they write in place and never record a graph.
"""
from typing import Callable, List, Optional

import torch

from ..common import fold_mapping, offset_chunks
from ..reference import footprint_view, reflect_pad
from .aggregation import aggregation

__all__ = ['pairwise_attention', 'patchwise_attention']

# elements of the attention weights of one sample chunk, per intra-op thread (each thread works on its share of a
# chunk; more threads want fewer, larger ops)
_ATTENTION_CHUNK_ELEMENTS = 1 << 19
# maps at most this wide are aggregated on the row-extended grid (see _aggregate_extended): at 28 pixels it is
# 2.5x faster than the plain loop, copy into the grid included; at 56 the copy costs more than the longer runs save
_EXTENDED_MAX_WIDTH = 28


def _attention_samples(batch: int, per_sample: int) -> int:
    """Samples per chunk of ``*_attention``, from the per-thread budget."""
    budget = _ATTENTION_CHUNK_ELEMENTS * torch.get_num_threads()
    return max(1, min(batch, budget // max(1, per_sample)))


def _extended_size(height: int, width: int, kernel_size: int) -> int:
    """Columns of the row-extended grid: position ``(h, w)`` at ``h * (W + k - 1) + w``, the last row unpadded."""
    return (height - 1) * (width + kernel_size - 1) + width


def _to_extended(weights: torch.Tensor, height: int, width: int, kernel_size: int) -> torch.Tensor:
    """``(B, Cw, k * k, H * W)`` weights on the row-extended grid ``(B, Cw, k * k, N)`` (the gaps are zeros)."""
    batch, planes, offsets = weights.shape[0], weights.shape[1], weights.shape[2]
    rows = weights.new_empty((batch, planes, offsets, height, width + kernel_size - 1))
    rows[..., :width] = weights.view(batch, planes, offsets, height, width)
    # the gaps only meet padding columns, but must hold numbers (uninitialised memory may be NaN or subnormal)
    rows[..., width:] = 0
    return rows.view(batch, planes, offsets, -1)[..., :_extended_size(height, width, kernel_size)]


def _aggregate_extended(x: torch.Tensor, weights: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """``aggregation(x, weights)`` for weights on the row-extended grid, without autograd.

    Every footprint offset of a row-padded map is then one contiguous run of the flattened padded map (the row
    gaps of the grid fall on the padding columns), so each multiply-add runs over ``N`` elements in one stretch
    instead of ``H`` runs of ``W``: on narrow maps (14 or 7 pixels) that is about twice as fast.
    """
    batch, channels, height, width = x.shape
    weight_planes = weights.shape[1]
    k, pad = kernel_size, kernel_size // 2
    padded_h, padded_w = height + 2 * pad, width + 2 * pad
    size = _extended_size(height, width, k)
    padded = reflect_pad(x, pad).reshape(batch, channels // weight_planes, weight_planes, padded_h * padded_w)
    weights = weights.reshape(batch, 1, weight_planes, k * k, weights.shape[-1])
    out = x.new_empty((batch, channels // weight_planes, weight_planes, height * padded_w))
    acc = out[..., :size]
    for kh in range(k):
        for kw in range(k):
            offset = kh * padded_w + kw
            window = padded[..., offset:offset + size]
            if kh == 0 and kw == 0:
                torch.mul(window, weights[:, :, :, 0], out=acc)
            else:
                acc.addcmul_(window, weights[:, :, :, kh * k + kw])
    return out.view(batch, channels, height, padded_w)[..., :width]


def _position_rows(
        position: torch.Tensor, folded: List[torch.Tensor], planes: int, kernel_size: int) -> torch.Tensor:
    """The first layer's input rows shared by every sample: the position relation and a row of ones.

    ``relu(scale * (p - p[nbr]) + shift)`` for the two position channels, then ones that carry the first layer's
    bias through its matmul: ``(3, k, k * H * W)``.
    """
    scale, shift = folded[0], folded[1]
    k, pad = kernel_size, kernel_size // 2
    height, width = position.shape[-2], position.shape[-1]
    pos_scale, pos_shift = scale[planes:].view(1, 2, 1, 1), shift[planes:].view(1, 2, 1, 1)
    pos_centre = (position * pos_scale + pos_shift).reshape(1, 2, 1, 1, height, width)
    pos_relation = torch.relu(pos_centre - footprint_view(reflect_pad(position * pos_scale, pad), k))
    ones = pos_relation.new_ones((1, 1, k, k, height, width))
    return torch.cat([pos_relation, ones], dim=1).view(3, k, k * height * width)


def _softmax_in_place(x: torch.Tensor, dim: int) -> torch.Tensor:
    """``torch.softmax(x, dim)`` written over ``x`` (no autograd): no fresh output of the size of ``x``."""
    x.sub_(x.amax(dim, keepdim=True)).exp_()
    return x.div_(x.sum(dim, keepdim=True))


def _pairwise_weights(
        x1: torch.Tensor,
        x2: torch.Tensor,
        pos_rows: torch.Tensor,
        folded: List[torch.Tensor],
        kernel_size: int,
        logits_buffer: torch.Tensor,
) -> torch.Tensor:
    """Softmax-normalised pairwise weights ``(B, Cw, k * k, H * W)``, computed in ``logits_buffer``.

    ``softmax_k(W2 relu(W1 relu(scale * [x1 - x2[nbr]; p - p[nbr]] + shift) + b1) + b2)``, footprint rows at a
    time. ``logits_buffer`` holds ``B * Cw * k * k * H * W`` elements or more (shared by the sample chunks).
    """
    scale, shift, weight1, bias1, weight2, bias2 = folded
    batch, planes, height, width = x1.shape
    k, pad, spatial = kernel_size, kernel_size // 2, height * width
    weight_planes = weight2.shape[0]
    # BN(x1[c] - x2[n]) = (scale * x1 + shift)[c] - (scale * x2)[n]: the affine map costs H * W, not k * k * H * W
    rel_scale, rel_shift = scale[:planes].view(1, planes, 1, 1), shift[:planes].view(1, planes, 1, 1)
    centre = (x1 * rel_scale + rel_shift).reshape(batch, planes, 1, 1, height, width)
    windows = footprint_view(reflect_pad(x2 * rel_scale, pad), k)
    # one matmul over [relation; position relation; ones] with [W1_rel, W1_pos, b1]; the hidden rows get a row
    # of ones that carries the last layer's bias through its matmul
    weight1 = torch.cat([weight1, bias1.view(-1, 1)], dim=1)
    weight2 = torch.cat([weight2, bias2.view(-1, 1)], dim=1)

    samples, rows = offset_chunks(batch, planes, k, spatial)
    logits = logits_buffer[:batch * weight_planes * k * k * spatial].view(batch, weight_planes, k, k * spatial)
    buffer = x1.new_empty((samples * (planes + 3) * rows * k * spatial,))
    hidden_buffer = x1.new_empty((samples, planes + 1, rows * k * spatial))
    hidden_buffer[:, planes] = 1
    for start in range(0, batch, samples):
        end = min(start + samples, batch)
        num = end - start
        for row in range(0, k, rows):
            row_end = min(row + rows, k)
            relation = buffer[:num * (planes + 3) * (row_end - row) * k * spatial].view(
                num, planes + 3, row_end - row, k * spatial)
            diff = relation[:, :planes].view(num, planes, row_end - row, k, height, width)
            torch.sub(centre[start:end], windows[start:end, :, row:row_end], out=diff).relu_()
            relation[:, planes:] = pos_rows[:, row:row_end]
            hidden = hidden_buffer[:num, :, :(row_end - row) * k * spatial]
            torch.bmm(weight1.expand(num, -1, -1), relation.view(num, planes + 3, -1), out=hidden[:, :planes])
            hidden[:, :planes].relu_()
            out = logits[start:end, :, row:row_end].view(num, weight_planes, -1)
            torch.bmm(weight2.expand(num, -1, -1), hidden, out=out)
    return _softmax_in_place(logits.view(batch, weight_planes, k * k, spatial), 2)


def _patchwise_weights(
        x1: torch.Tensor,
        x2: torch.Tensor,
        folded: List[torch.Tensor],
        kernel_size: int,
        weights_buffer: torch.Tensor,
) -> torch.Tensor:
    """Patchwise weights ``(B, Cw, k * k, H * W)``, the samples side by side in the columns of every matmul.

    ``W2 relu(W1 relu(scale * [x1; x2 over the footprint] + shift) + b1) + b2``, the first layer's sum over the
    footprint accumulated row by row. Both layers run as one matrix product over ``B * H * W`` columns instead of
    ``B`` products over ``H * W`` (on 14x14 and 7x7 maps a product that narrow runs at half speed). The relation is
    written chunk by chunk into one buffer, channel-major: ``(R, rows, k, B, H * W)``. The weights come out
    ``(Cw, k * k, B, H * W)`` in ``weights_buffer`` and are returned as a ``(B, Cw, k * k, H * W)`` view.
    """
    scale, shift, weight1, bias1, weight2, bias2 = folded
    batch, planes, height, width = x1.shape
    k, columns = kernel_size, batch * height * width
    weight_planes = weight1.shape[0]
    centre = torch.addcmul(shift[:planes].view(1, -1, 1, 1), x1, scale[:planes].view(1, -1, 1, 1)).relu_()
    # hidden gets a row of ones that carries the last layer's bias through its matmul
    hidden_rows = x1.new_empty((weight_planes + 1, batch, height * width))
    hidden_rows[weight_planes] = 1
    hidden = hidden_rows[:weight_planes].view(weight_planes, columns)
    centre = centre.view(batch, planes, -1).transpose(0, 1).reshape(planes, columns)
    torch.addmm(bias1.view(-1, 1), weight1[:, :planes], centre, out=hidden)

    windows = footprint_view(reflect_pad(x2, k // 2), k).permute(1, 2, 3, 0, 4, 5)
    foot_scale = scale[planes:].view(planes, k, k, 1, 1, 1)
    foot_shift = shift[planes:].view(planes, k, k, 1, 1, 1)
    foot_weight = weight1[:, planes:].reshape(weight_planes, planes, k, k)
    # the batch is one wide map here: chunks of footprint rows over all samples
    rows = offset_chunks(1, planes, k, columns)[1]
    buffer = x1.new_empty((planes * rows * k * columns,))
    for row in range(0, k, rows):
        row_end = min(row + rows, k)
        relation = buffer[:planes * (row_end - row) * k * columns].view(planes, row_end - row, k, batch, height, width)
        torch.addcmul(
            foot_shift[:, row:row_end], windows[:, row:row_end], foot_scale[:, row:row_end], out=relation).relu_()
        hidden.addmm_(foot_weight[:, :, row:row_end].reshape(weight_planes, -1), relation.view(-1, columns))
    hidden.relu_()
    weight2 = torch.cat([weight2, bias2.view(-1, 1)], dim=1)
    weights = weights_buffer[:weight2.shape[0] * columns].view(weight2.shape[0], columns)
    torch.mm(weight2, hidden_rows.view(weight_planes + 1, columns), out=weights)
    return weights.view(weight_planes, k * k, batch, height * width).permute(2, 0, 1, 3)


def _attend_by_sample_chunks(
        weights_of: Callable[[int, int, torch.Tensor], torch.Tensor],
        x3: torch.Tensor,
        per_sample: int,
        kernel_size: int,
) -> torch.Tensor:
    """``aggregation(x3, weights)``, a few samples at a time, into one output.

    Args:
        weights_of: ``weights_of(start, end, buffer)``: the ``(end - start, Cw, k * k, H * W)`` weights of samples
            ``start:end``, computed in ``buffer`` (a flat tensor the chunks share).
        x3: Aggregated map ``(B, C, H, W)``.
        per_sample: Weights elements of one sample.
        kernel_size: Footprint side ``k``.
    """
    batch, height, width = x3.shape[0], x3.shape[2], x3.shape[3]
    step = _attention_samples(batch, per_sample)
    extended = width <= _EXTENDED_MAX_WIDTH
    out = torch.empty_like(x3, memory_format=torch.contiguous_format)
    buffer = x3.new_empty((step * per_sample,))
    for start in range(0, batch, step):
        end = min(start + step, batch)
        weights = weights_of(start, end, buffer)
        if extended:
            out[start:end] = _aggregate_extended(
                x3[start:end], _to_extended(weights, height, width, kernel_size), kernel_size)
        else:
            out[start:end] = aggregation(x3[start:end], weights, kernel_size)
    return out


def pairwise_attention(
        x1: torch.Tensor,
        x2: torch.Tensor,
        x3: torch.Tensor,
        position: torch.Tensor,
        mapping: List[Optional[torch.Tensor]],
        eps1: float,
        eps2: float,
        kernel_size: int,
) -> torch.Tensor:
    """``aggregation(x3, pairwise weights of x1, x2 and the position)`` with the eval-mode mapping.

    Args:
        x1: Centre map ``(B, R, H, W)`` (conv1 output).
        x2: Neighbour map ``(B, R, H, W)`` (conv2 output).
        x3: Aggregated map ``(B, C, H, W)`` (conv3 output).
        position: Position encoding ``(1, 2, H, W)`` (conv_p output).
        mapping: The weight mapping's tensors, as ``fold_mapping`` takes them (``R + 2`` input channels,
            ``R`` hidden, ``Cw`` output).
        eps1: First BatchNorm's epsilon.
        eps2: Second BatchNorm's epsilon.
        kernel_size: Footprint side ``k`` (odd).

    Returns:
        Tensor of shape ``(B, C, H, W)``.
    """
    folded = fold_mapping(mapping, eps1, eps2)
    pos_rows = _position_rows(position, folded, x1.shape[1], kernel_size)
    per_sample = folded[4].shape[0] * kernel_size * kernel_size * x1.shape[2] * x1.shape[3]

    def weights_of(start: int, end: int, buffer: torch.Tensor) -> torch.Tensor:
        return _pairwise_weights(x1[start:end], x2[start:end], pos_rows, folded, kernel_size, buffer)

    return _attend_by_sample_chunks(weights_of, x3, per_sample, kernel_size)


def patchwise_attention(
        x1: torch.Tensor,
        x2: torch.Tensor,
        x3: torch.Tensor,
        mapping: List[Optional[torch.Tensor]],
        eps1: float,
        eps2: float,
        kernel_size: int,
) -> torch.Tensor:
    """``aggregation(x3, patchwise weights of x1 and x2)`` with the eval-mode mapping.

    Args:
        x1: Centre map ``(B, R, H, W)`` (conv1 output).
        x2: Footprint map ``(B, R, H, W)`` (conv2 output).
        x3: Aggregated map ``(B, C, H, W)`` (conv3 output).
        mapping: The weight mapping's tensors, as ``fold_mapping`` takes them (``R * (k * k + 1)`` input
            channels, the footprint's channel-major (``c * k * k + offset``) after the ``R`` centre channels;
            ``Cw`` hidden; ``k * k * Cw`` output).
        eps1: First BatchNorm's epsilon.
        eps2: Second BatchNorm's epsilon.
        kernel_size: Footprint side ``k`` (odd).

    Returns:
        Tensor of shape ``(B, C, H, W)``.
    """
    folded = fold_mapping(mapping, eps1, eps2)
    per_sample = folded[2].shape[0] * kernel_size * kernel_size * x1.shape[2] * x1.shape[3]

    def weights_of(start: int, end: int, buffer: torch.Tensor) -> torch.Tensor:
        return _patchwise_weights(x1[start:end], x2[start:end], folded, kernel_size, buffer)

    return _attend_by_sample_chunks(weights_of, x3, per_sample, kernel_size)
