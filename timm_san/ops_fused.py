""" Fused inference operators of SAN: the attention weights without k x k-fold relation buffers

In eval mode every BatchNorm of SAM's weight mapping is a fixed per-channel affine map, so the mapping can be
evaluated a few footprint offsets (and samples) at a time: the relation of a chunk is built straight from a
strided view of the padded map, pushed through both 1x1 layers while it is still in cache, and only the
``(B, Cw, k * k, H * W)`` weights are written out. The unfused path materialises the ``(B, C_rel, k * k, H * W)``
relation and every intermediate of the mapping.

``pairwise_attention`` / ``patchwise_attention`` go one step further for the module's forward: weights and
aggregation of a few samples at a time on CPU, so each sample's weights are consumed while still in cache and no
weights tensor of the whole batch (tens of MB at 56 x 56, fresh pages from the OS on every call) is allocated.
The chunks share one weights buffer (pairwise's softmax runs in place in it) and write into one output.

The results equal the unfused operators up to float rounding (the affine maps are folded into the
neighbouring layers and the first layer's sum is accumulated chunk by chunk). Everything here is made of
differentiable PyTorch ops, so gradients through an eval-mode model still work.
"""
from typing import Callable, List, Optional, Tuple

import torch
from timm.layers import register_notrace_function

from .fusable import needs_grad
from .ops import aggregation, footprint_view, reflect_pad

__all__ = [
    'pairwise_weights', 'patchwise_weights', 'pairwise_attention', 'patchwise_attention', 'fold_mapping',
    'offset_chunks',
]

# elements of one chunk's relation buffer: small enough to stay in a core's L2 cache
_CHUNK_ELEMENTS = 1 << 18
# on a GPU every chunk costs kernel launches: the whole batch in one chunk
_DEVICE_CHUNK_ELEMENTS = 1 << 27
# elements of the attention weights of one sample chunk in pairwise_attention / patchwise_attention (CPU), per
# intra-op thread (each thread works on its share of a chunk; more threads want fewer, larger ops)
_ATTENTION_CHUNK_ELEMENTS = 1 << 19
# maps at most this wide are aggregated on the row-extended grid (see _aggregate_extended): at 28 pixels it is
# 2.5x faster than the plain loop, copy into the grid included; at 56 the copy costs more than the longer runs save
_EXTENDED_MAX_WIDTH = 28


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


def _chunk_elements(x: torch.Tensor) -> int:
    return _CHUNK_ELEMENTS if x.device.type == 'cpu' else _DEVICE_CHUNK_ELEMENTS


def _attention_samples(x: torch.Tensor, per_sample: int) -> int:
    """Samples per chunk of ``*_attention``: the whole batch off CPU and under torch.compile."""
    batch = x.shape[0]
    if x.device.type != 'cpu' or torch.compiler.is_compiling():
        return batch
    budget = _ATTENTION_CHUNK_ELEMENTS * torch.get_num_threads()
    return max(1, min(batch, budget // max(1, per_sample)))


def _extended_size(height: int, width: int, kernel_size: int) -> int:
    """Columns of the row-extended grid: position ``(h, w)`` at ``h * (W + k - 1) + w``, the last row unpadded."""
    return (height - 1) * (width + kernel_size - 1) + width


def _use_extended(x: torch.Tensor, kernel_size: int, *tensors: torch.Tensor) -> bool:
    """Whether the attention of ``x``'s map is aggregated on the row-extended grid (CPU inference, narrow maps)."""
    return (
        x.device.type == 'cpu'
        and x.shape[-1] <= _EXTENDED_MAX_WIDTH
        and not torch.compiler.is_compiling()
        and not needs_grad(x, *tensors)
    )


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


def _relation_chunk(
        centre: torch.Tensor,
        windows: torch.Tensor,
        scale: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``relu(centre - windows)``, or ``relu(centre + windows * scale)`` given a scale, in contiguous layout.

    Broadcasting against the overlapping window view would otherwise pick a permuted output layout. Under autograd
    and torch.compile (whose out= handling keeps that layout) the result is made contiguous instead.
    """
    if torch.compiler.is_compiling() or needs_grad(centre, windows, scale):
        relation = centre - windows if scale is None else torch.addcmul(centre, windows, scale)
        return relation.contiguous().relu_()
    shape = torch.broadcast_shapes(centre.shape, windows.shape)
    relation = torch.empty(shape, dtype=windows.dtype, device=windows.device)
    if scale is None:
        torch.sub(centre, windows, out=relation)
    else:
        torch.addcmul(centre, windows, scale, out=relation)
    return relation.relu_()


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
        logits_buffer: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """The pairwise weights; without autograd they are computed in ``logits_buffer`` where one is given.

    ``logits_buffer`` holds ``B * Cw * k * k * H * W`` elements or more: ``pairwise_attention`` passes one buffer to
    all its sample chunks, so the chunks reuse its memory instead of each faulting in pages of its own.
    """
    scale, shift, weight1, bias1, weight2, bias2 = folded
    batch, planes, height, width = x1.shape
    k, pad, spatial = kernel_size, kernel_size // 2, height * width
    weight_planes = weight2.shape[0]
    # BN(x1[c] - x2[n]) = (scale * x1 + shift)[c] - (scale * x2)[n]: the affine map costs H * W, not k * k * H * W
    rel_scale, rel_shift = scale[:planes].view(1, planes, 1, 1), shift[:planes].view(1, planes, 1, 1)
    centre = (x1 * rel_scale + rel_shift).reshape(batch, planes, 1, 1, height, width)
    windows = footprint_view(reflect_pad(x2 * rel_scale, pad), k)
    # one matmul over [relation; position relation; ones] with [W1_rel, W1_pos, b1]
    weight1 = torch.cat([weight1, bias1.view(-1, 1)], dim=1)
    # without autograd (or the compiler) every chunk is written in place: relation rows into one buffer, the
    # logits straight into their slice of the output
    in_place = not (torch.compiler.is_compiling() or needs_grad(x1, x2, pos_rows, weight1, weight2, bias2))

    samples, rows = offset_chunks(batch, planes, k, spatial, _chunk_elements(x1))
    logits_shape = (batch, weight_planes, k, k * spatial)
    if in_place and logits_buffer is not None:
        logits = logits_buffer[:batch * weight_planes * k * k * spatial].view(logits_shape)
    else:
        logits = x1.new_empty(logits_shape)
    buffer = x1.new_empty((samples * (planes + 3) * rows * k * spatial,)) if in_place else None
    if in_place:
        # the hidden rows get a row of ones that carries the last layer's bias through its matmul
        hidden_buffer = x1.new_empty((samples, planes + 1, rows * k * spatial))
        hidden_buffer[:, planes] = 1
        weight2 = torch.cat([weight2, bias2.view(-1, 1)], dim=1)
    for start in range(0, batch, samples):
        end = min(start + samples, batch)
        num = end - start
        for row in range(0, k, rows):
            row_end = min(row + rows, k)
            if buffer is not None:
                relation = buffer[:num * (planes + 3) * (row_end - row) * k * spatial].view(
                    num, planes + 3, row_end - row, k * spatial)
                diff = relation[:, :planes].view(num, planes, row_end - row, k, height, width)
                torch.sub(centre[start:end], windows[start:end, :, row:row_end], out=diff).relu_()
                relation[:, planes:] = pos_rows[:, row:row_end]
            else:
                relation = torch.cat([
                    _relation_chunk(centre[start:end], windows[start:end, :, row:row_end]).reshape(
                        num, planes, row_end - row, k * spatial),
                    pos_rows[:, row:row_end].expand(num, -1, -1, -1),
                ], dim=1)
            if buffer is not None:
                hidden = hidden_buffer[:num, :, :(row_end - row) * k * spatial]
                torch.bmm(weight1.expand(num, -1, -1), relation.view(num, planes + 3, -1), out=hidden[:, :planes])
                hidden[:, :planes].relu_()
                out = logits[start:end, :, row:row_end].view(num, weight_planes, -1)
                torch.bmm(weight2.expand(num, -1, -1), hidden, out=out)
            else:
                hidden = _bmm(weight1, relation.view(num, planes + 3, -1)).relu_()
                chunk = _bmm(weight2, hidden).add_(bias2.view(1, -1, 1))
                logits[start:end, :, row:row_end] = chunk.view(num, weight_planes, row_end - row, k * spatial)
    logits = logits.view(batch, weight_planes, k * k, spatial)
    return _softmax_in_place(logits, 2) if in_place else torch.softmax(logits, dim=2)


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
    folded = fold_mapping(mapping, eps1, eps2)
    pos_rows = _position_rows(position, folded, x1.shape[1], kernel_size)
    return _pairwise_weights(x1, x2, pos_rows, folded, kernel_size)


def _patchwise_weights(
        x1: torch.Tensor,
        x2: torch.Tensor,
        folded: List[torch.Tensor],
        kernel_size: int,
        weights_buffer: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    if not (torch.compiler.is_compiling() or needs_grad(x1, x2, *folded)):
        return _patchwise_weights_in_place(x1, x2, folded, kernel_size, weights_buffer)
    scale, shift, weight1, bias1, weight2, bias2 = folded
    batch, planes, height, width = x1.shape
    k, spatial = kernel_size, height * width
    weight_planes = weight1.shape[0]
    centre = torch.relu(x1 * scale[:planes].view(1, planes, 1, 1) + shift[:planes].view(1, planes, 1, 1))
    hidden = torch.baddbmm(
        bias1.view(1, -1, 1), weight1[:, :planes].expand(batch, -1, -1), centre.reshape(batch, planes, spatial))
    windows = footprint_view(reflect_pad(x2, k // 2), k)
    foot_scale = scale[planes:].view(1, planes, k, k, 1, 1)
    foot_shift = shift[planes:].view(1, planes, k, k, 1, 1)
    foot_weight = weight1[:, planes:].reshape(weight_planes, planes, k, k)
    samples, rows = offset_chunks(batch, planes, k, spatial, _chunk_elements(x1))
    chunks: List[torch.Tensor] = []
    for start in range(0, batch, samples):
        end = min(start + samples, batch)
        acc = hidden[start:end]
        for row in range(0, k, rows):
            row_end = min(row + rows, k)
            relation = _relation_chunk(
                foot_shift[:, :, row:row_end], windows[start:end, :, row:row_end], foot_scale[:, :, row:row_end])
            row_weight = foot_weight[:, :, row:row_end].reshape(weight_planes, -1).expand(end - start, -1, -1)
            acc = torch.baddbmm(acc, row_weight, relation.reshape(end - start, -1, spatial))
        chunks.append(acc)
    hidden = torch.cat(chunks, dim=0) if len(chunks) > 1 else chunks[0]
    weights = _bmm(weight2, hidden.relu_()).add_(bias2.view(1, -1, 1))
    return weights.view(batch, weight_planes, k * k, spatial)


def _patchwise_weights_in_place(
        x1: torch.Tensor,
        x2: torch.Tensor,
        folded: List[torch.Tensor],
        kernel_size: int,
        weights_buffer: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``_patchwise_weights`` without autograd, the samples side by side in the columns of every matmul.

    Both layers then run as one matrix product over ``B * H * W`` columns instead of ``B`` products over ``H * W``
    (on 14x14 and 7x7 maps a product that narrow runs at half speed). The relation is written chunk by chunk
    into one buffer, channel-major: ``(R, rows, k, B, H * W)``. The weights come out ``(Cw, k * k, B, H * W)`` in
    memory and are returned as a ``(B, Cw, k * k, H * W)`` view.
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
    rows = offset_chunks(1, planes, k, columns, _chunk_elements(x1))[1]
    buffer = x1.new_empty((planes * rows * k * columns,))
    for row in range(0, k, rows):
        row_end = min(row + rows, k)
        relation = buffer[:planes * (row_end - row) * k * columns].view(planes, row_end - row, k, batch, height, width)
        torch.addcmul(
            foot_shift[:, row:row_end], windows[:, row:row_end], foot_scale[:, row:row_end], out=relation).relu_()
        hidden.addmm_(foot_weight[:, :, row:row_end].reshape(weight_planes, -1), relation.view(-1, columns))
    hidden.relu_()
    weight2 = torch.cat([weight2, bias2.view(-1, 1)], dim=1)
    if weights_buffer is None:
        weights = torch.mm(weight2, hidden_rows.view(weight_planes + 1, columns))
    else:
        weights = weights_buffer[:weight2.shape[0] * columns].view(weight2.shape[0], columns)
        torch.mm(weight2, hidden_rows.view(weight_planes + 1, columns), out=weights)
    return weights.view(weight_planes, k * k, batch, height * width).permute(2, 0, 1, 3)


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
    return _patchwise_weights(x1, x2, fold_mapping(mapping, eps1, eps2), kernel_size)


def _attend_chunk(
        x3: torch.Tensor,
        weights: torch.Tensor,
        kernel_size: int,
        out_affine: Optional[Tuple[torch.Tensor, torch.Tensor]],
        extended: bool,
        out: Optional[torch.Tensor],
) -> torch.Tensor:
    """The aggregation of one sample chunk, then ``relu(x * scale + shift)`` given ``out_affine``, into ``out``.

    ``out`` is the chunk's slice of the whole batch's output (no autograd), or None for a fresh tensor.
    """
    if extended:
        agg = _aggregate_extended(x3, weights, kernel_size)
    else:
        agg = aggregation(x3, weights, kernel_size)
    if out_affine is None:
        if out is None:
            return agg.contiguous()
        return out.copy_(agg)
    # the block's BatchNorm and ReLU while the chunk is in cache
    scale, shift = out_affine
    if out is None:
        return torch.addcmul(shift, agg, scale).relu_()
    return torch.addcmul(shift, agg, scale, out=out).relu_()


def _out_affine(
        out_norm: Optional[List[Optional[torch.Tensor]]], out_eps: float,
) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """The output BatchNorm ``[weight, bias, running_mean, running_var]`` as ``(scale, shift)`` of shape (C, 1, 1)."""
    if out_norm is None:
        return None
    running_mean, running_var = out_norm[2], out_norm[3]
    assert running_mean is not None and running_var is not None
    scale, shift = _bn_affine(out_norm[0], out_norm[1], running_mean, running_var, out_eps)
    return scale.view(-1, 1, 1), shift.view(-1, 1, 1)


def _attend_by_sample_chunks(
        weights_of: Callable[[int, int, Optional[torch.Tensor]], torch.Tensor],
        x3: torch.Tensor,
        per_sample: int,
        kernel_size: int,
        out_norm: Optional[List[Optional[torch.Tensor]]],
        out_eps: float,
        inputs: List[torch.Tensor],
) -> torch.Tensor:
    """``aggregation(x3, weights)``, then ``relu(out_norm(...))`` given ``out_norm``, a few samples at a time on CPU.

    Args:
        weights_of: ``weights_of(start, end, buffer)``: the ``(end - start, Cw, k * k, H * W)`` weights of samples
            ``start:end``, computed in ``buffer`` (a flat tensor) where it is not None.
        x3: Aggregated map ``(B, C, H, W)``.
        per_sample: Weights elements of one sample.
        kernel_size: Footprint side ``k``.
        out_norm: ``[weight, bias, running_mean, running_var]`` of an eval BatchNorm, or None.
        out_eps: That BatchNorm's epsilon.
        inputs: Every tensor the weights are computed from (for the autograd and device checks).

    Without autograd the sample chunks share one weights buffer and write into one output: memory the next chunk
    finds in cache and already mapped, where fresh tensors per chunk (megabytes at 56 x 56) would each take their
    pages from the OS again.
    """
    batch, height, width = x3.shape[0], x3.shape[2], x3.shape[3]
    step = _attention_samples(x3, per_sample)
    extended = _use_extended(x3, kernel_size, *inputs)
    affine = _out_affine(out_norm, out_eps)
    shared = step < batch and not (torch.compiler.is_compiling() or needs_grad(x3, *inputs))
    out = torch.empty_like(x3, memory_format=torch.contiguous_format) if shared else None
    buffer = x3.new_empty((step * per_sample,)) if shared else None
    chunks: List[torch.Tensor] = []
    for start in range(0, batch, step):
        end = min(start + step, batch)
        weights = weights_of(start, end, buffer)
        if extended:
            weights = _to_extended(weights, height, width, kernel_size)
        chunk_out = None if out is None else out[start:end]
        chunks.append(_attend_chunk(x3[start:end], weights, kernel_size, affine, extended, chunk_out))
    if out is not None:
        return out
    return chunks[0] if len(chunks) == 1 else torch.cat(chunks)


@register_notrace_function
def pairwise_attention(
        x1: torch.Tensor,
        x2: torch.Tensor,
        x3: torch.Tensor,
        position: torch.Tensor,
        mapping: List[Optional[torch.Tensor]],
        eps1: float,
        eps2: float,
        kernel_size: int,
        out_norm: Optional[List[Optional[torch.Tensor]]] = None,
        out_eps: float = 1e-5,
) -> torch.Tensor:
    """``aggregation(x3, pairwise_weights(x1, x2, position, ...))``, a few samples at a time on CPU.

    Args:
        x1: Centre map ``(B, R, H, W)`` (conv1 output).
        x2: Neighbour map ``(B, R, H, W)`` (conv2 output).
        x3: Aggregated map ``(B, C, H, W)`` (conv3 output).
        position: Position encoding ``(1, 2, H, W)`` (conv_p output).
        mapping: The eval-mode weight mapping's tensors, as ``pairwise_weights`` takes them.
        eps1: First BatchNorm's epsilon.
        eps2: Second BatchNorm's epsilon.
        kernel_size: Footprint side ``k`` (odd).
        out_norm: ``[weight, bias, running_mean, running_var]`` of an eval BatchNorm: return
            ``relu(batch_norm(out))`` instead, applied chunk by chunk.
        out_eps: That BatchNorm's epsilon.

    Returns:
        Tensor of shape ``(B, C, H, W)``.
    """
    folded = fold_mapping(mapping, eps1, eps2)
    pos_rows = _position_rows(position, folded, x1.shape[1], kernel_size)
    per_sample = folded[4].shape[0] * kernel_size * kernel_size * x1.shape[2] * x1.shape[3]

    def weights_of(start: int, end: int, buffer: Optional[torch.Tensor]) -> torch.Tensor:
        return _pairwise_weights(x1[start:end], x2[start:end], pos_rows, folded, kernel_size, buffer)

    return _attend_by_sample_chunks(
        weights_of, x3, per_sample, kernel_size, out_norm, out_eps, [x1, x2, position, *folded])


@register_notrace_function
def patchwise_attention(
        x1: torch.Tensor,
        x2: torch.Tensor,
        x3: torch.Tensor,
        mapping: List[Optional[torch.Tensor]],
        eps1: float,
        eps2: float,
        kernel_size: int,
        out_norm: Optional[List[Optional[torch.Tensor]]] = None,
        out_eps: float = 1e-5,
) -> torch.Tensor:
    """``aggregation(x3, patchwise_weights(x1, x2, ...))``, a few samples at a time on CPU.

    Args:
        x1: Centre map ``(B, R, H, W)`` (conv1 output).
        x2: Footprint map ``(B, R, H, W)`` (conv2 output).
        x3: Aggregated map ``(B, C, H, W)`` (conv3 output).
        mapping: The eval-mode weight mapping's tensors, as ``patchwise_weights`` takes them.
        eps1: First BatchNorm's epsilon.
        eps2: Second BatchNorm's epsilon.
        kernel_size: Footprint side ``k`` (odd).
        out_norm: ``[weight, bias, running_mean, running_var]`` of an eval BatchNorm: return
            ``relu(batch_norm(out))`` instead, applied chunk by chunk.
        out_eps: That BatchNorm's epsilon.

    Returns:
        Tensor of shape ``(B, C, H, W)``.
    """
    folded = fold_mapping(mapping, eps1, eps2)
    per_sample = folded[2].shape[0] * kernel_size * kernel_size * x1.shape[2] * x1.shape[3]

    def weights_of(start: int, end: int, buffer: Optional[torch.Tensor]) -> torch.Tensor:
        return _patchwise_weights(x1[start:end], x2[start:end], folded, kernel_size, buffer)

    return _attend_by_sample_chunks(weights_of, x3, per_sample, kernel_size, out_norm, out_eps, [x1, x2, *folded])
