""" Training-mode attention of SAN without k x k-fold buffers: pairwise and patchwise

In training, SAM's weight mapping (BN, ReLU, 1x1 conv, BN, ReLU, 1x1 conv) normalises with batch statistics, and
plain autograd keeps its input, the ``k * k``-fold relation, and every intermediate for backward. The operators
here (SAM's three 1x1 convs, the mapping, the softmax and the aggregation in one ``torch.autograd.Function`` each)
keep only SAM's input (which the ReLU before it keeps anyway) and per-channel batch statistics; forward and
backward rebuild what they need a few footprint rows at a time, into reused buffers.

Pairwise, relation ``[x1[c] - x2[nbr]; p[c] - p[nbr]]``:
    * the first BatchNorm's mean comes in closed form from map-sized sums, its variance from one pass over
      relation chunks; its output is ``(s * x1 + t)[c] - (s * x2)[nbr]`` (an affine map of each input);
    * the hidden layer (footprint-sized) is kept whole in forward only: the second BatchNorm needs its statistics;
    * backward rebuilds the mapping twice: once for the softmax and the second BatchNorm's reductions, once for
      the first BatchNorm's. The first BatchNorm's input gradient is linear in two maps (its upstream gradient
      summed over the footprint, and scattered back onto the neighbours), so it is formed on ``(B, C, H, W)``
      maps, never per offset.

Patchwise, relation ``[x1; x2 over the footprint]``:
    * the first BatchNorm's statistics per (channel, offset) are window sums of the batch-summed map;
    * the first layer sums over the footprint, so the hidden layer is map-sized: it is saved for backward;
    * backward takes one pass over footprint rows; the first BatchNorm's terms other than its upstream gradient
      are per (channel, offset) constants and ``x2`` itself, placed on each offset's window after the pass.

The results equal the reference up to float rounding, the batch statistics included. Chunks are sized for a CPU
core's cache. These are the kernels of ``timm_san.ops``' attention operators in training, forward and backward;
they run below autograd.
"""
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ..common import bn_scale_shift, check_batch_size, offset_chunks
from ..reference import aggregation_input_grad, footprint_backward, footprint_view, reflect_pad, reflect_pad_backward
from .aggregation import aggregation
from .conv1x1 import conv1x1_concat, conv1x1_concat_backward

__all__ = ['pairwise_forward', 'pairwise_backward', 'patchwise_forward', 'patchwise_backward']

# elements of the footprint-sized buffers (hidden layer, logits) of one block of whole samples in backward
_BLOCK_ELEMENTS = 1 << 21

Chunk = Tuple[int, int, int, int]


def _chunks(batch: int, planes: int, kernel_size: int, spatial: int) -> List[Chunk]:
    """``(first sample, end sample, first footprint row, end row)`` of every chunk, samples outermost."""
    samples, rows = offset_chunks(batch, planes, kernel_size, spatial)
    return [
        (b, min(b + samples, batch), r, min(r + rows, kernel_size))
        for b in range(0, batch, samples) for r in range(0, kernel_size, rows)
    ]


def _blocks(batch: int, sample_elements: int) -> List[Tuple[int, int]]:
    """Blocks of whole samples whose footprint-sized buffers stay below ``_BLOCK_ELEMENTS``."""
    samples = max(1, min(batch, _BLOCK_ELEMENTS // max(1, sample_elements)))
    return [(b, min(b + samples, batch)) for b in range(0, batch, samples)]


def _difference(centre: torch.Tensor, windows: torch.Tensor) -> torch.Tensor:
    """``centre - windows`` in a fresh contiguous buffer (broadcasting would pick the windows' permuted layout)."""
    out = torch.empty(torch.broadcast_shapes(centre.shape, windows.shape), dtype=windows.dtype, device=windows.device)
    return torch.sub(centre, windows, out=out)


def _channel_sums(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-channel sum and sum of squares of a ``(b, C, M)`` tensor (a norm: no squared copy)."""
    norm = torch.linalg.vector_norm(x, dim=2)
    return x.sum((0, 2)), (norm * norm).sum(0)


def _window_sums(padded: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Sums of all ``k x k`` windows of a padded map, a row then a column at a time (``2 * k`` reads, not
    ``k * k``)."""
    return padded.unfold(3, kernel_size, 1).sum(-1).unfold(2, kernel_size, 1).sum(-1)


def _box_sum(x: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Sum of every position's reflection-padded footprint: ``sum over offsets of x[nbr]``."""
    return _window_sums(reflect_pad(x, kernel_size // 2), kernel_size)


def _box_scatter(x: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Adjoint of ``_box_sum``: every position's value added to each of its neighbours, padding folded back."""
    k = kernel_size
    padded = _window_sums(F.pad(x, [k - 1] * 4), k)
    return reflect_pad_backward(padded, x.shape[-2], x.shape[-1], k // 2)


def _read_counts(height: int, width: int, kernel_size: int, like: torch.Tensor) -> torch.Tensor:
    """``(H, W)``: how many (position, offset) pairs read each pixel as a neighbour (reflection included)."""
    ones = like.new_ones((1, 1, kernel_size * kernel_size, height * width))
    return footprint_backward(ones, height, width, kernel_size).view(height, width)


def _position_relation(position: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """``p[c] - p[nbr]`` of the ``(1, 2, H, W)`` position encoding, as ``(2, k * k * H * W)``."""
    _, channels, height, width = position.shape
    centre = position.reshape(1, channels, 1, 1, height, width)
    windows = footprint_view(reflect_pad(position, kernel_size // 2), kernel_size)
    return _difference(centre, windows).view(channels, -1)


def _relation_moments(
        x1: torch.Tensor, x2: torch.Tensor, kernel_size: int, workspace: '_Workspace',
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Mean and biased variance per channel of ``x1[c] - x2[nbr]`` over batch, footprint and map.

    The mean is exact from two map-sized sums; the variance sums squares of the relation centred on that mean,
    chunk by chunk (with the usual correction for the rounding of the mean), as a two-pass BatchNorm would.
    """
    batch, planes, height, width = x1.shape
    k = kernel_size
    n = batch * k * k * height * width
    counts = _read_counts(height, width, k, x1)
    mean = (x1.sum((0, 2, 3)) * (k * k) - (x2 * counts).sum((0, 2, 3))) / n
    centre = (x1 - mean.view(1, planes, 1, 1)).view(batch, planes, 1, 1, height, width)
    windows = footprint_view(reflect_pad(x2, k // 2), k)
    linear, square = x1.new_zeros(planes), x1.new_zeros(planes)
    for b0, b1, r0, r1 in _chunks(batch, planes, k, height * width):
        chunk_centre, chunk_windows = centre[b0:b1], windows[b0:b1, :, r0:r1]
        relation = workspace('relation', torch.broadcast_shapes(chunk_centre.shape, chunk_windows.shape))
        torch.sub(chunk_centre, chunk_windows, out=relation)
        chunk_linear, chunk_square = _channel_sums(relation.view(b1 - b0, planes, -1))
        linear += chunk_linear
        square += chunk_square
    var = (square - linear * linear / n) / n
    return mean, var


def _aggregation_weight_grad_into(
        x_padded: torch.Tensor, grad: torch.Tensor, out: torch.Tensor, workspace: '_Workspace') -> None:
    """Gradient of the aggregation w.r.t. its weights, ``(b, Cw, k * k, H * W)``, written to ``out``."""
    batch, channels, height, width = grad.shape
    weight_planes, offsets = out.shape[1], out.shape[2]
    k = x_padded.shape[-1] - width + 1
    groups = channels // weight_planes
    x_padded = x_padded.view(batch, groups, weight_planes, height + k - 1, width + k - 1)
    grad = grad.view(batch, groups, weight_planes, height, width)
    out = out.view(batch, weight_planes, offsets, height, width)
    product = workspace('weight_grad', grad.shape)
    for kh in range(k):
        for kw in range(k):
            torch.mul(x_padded[..., kh:kh + height, kw:kw + width], grad, out=product)
            torch.sum(product, 1, out=out[:, :, kh * k + kw])


def _scatter_rows(grad: torch.Tensor, padded: torch.Tensor, workspace: '_Workspace') -> None:
    """Add each offset's ``(b, C, rows, k, H, W)`` gradient onto the padded map, shifted by the offset.

    One shifted add per offset on large maps (vectorised and parallel); ``col2im`` (one call per sample, but a
    scalar loop) where the maps are small and the offsets many.
    """
    batch, planes, rows, k, height, width = grad.shape
    if planes * height * width >= 1 << 14:
        for i in range(rows):
            for j in range(k):
                padded[:, :, i:i + height, j:j + width] += grad[:, :, i, j]
        return
    band = (height + rows - 1, width + k - 1)
    for index in range(batch):
        folded = torch.ops.aten.col2im.out(
            grad[index].reshape(planes * rows * k, height * width), band, [rows, k], [1, 1], [0, 0], [1, 1],
            out=workspace('folded', (planes, *band)))
        padded[index, :, :band[0]] += folded


def _running_stats_update(
        mean1: torch.Tensor, var1: torch.Tensor, mean2: torch.Tensor, var2: torch.Tensor, n: int) -> torch.Tensor:
    """``[mean1, var1, mean2, var2]`` with the biased batch variances made unbiased, as BatchNorm keeps them."""
    unbias = n / max(n - 1, 1)
    return torch.cat([mean1, var1 * unbias, mean2, var2 * unbias])


class _Workspace:
    """Buffers reused from chunk to chunk, by name.

    A fresh allocation of a chunk-sized buffer is returned to the system when freed and page-faults again on its
    first write: for chunks of a few hundred thousand elements that costs more than the arithmetic.
    """

    def __init__(self, like: torch.Tensor):
        self.like = like
        self.buffers: Dict[str, torch.Tensor] = {}

    def __call__(self, name: str, shape: Sequence[int]) -> torch.Tensor:
        numel = 1
        for size in shape:
            numel *= size
        buffer = self.buffers.get(name)
        if buffer is None or buffer.numel() < numel:
            buffer = self.like.new_empty(numel)
            self.buffers[name] = buffer
        return buffer[:numel].view(shape)


def _matmul(weight: torch.Tensor, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``weight @ x`` of a ``(b, K, M)`` batch into ``out`` (which may be a strided view when ``b == 1``)."""
    if x.shape[0] == 1:
        torch.mm(weight, x[0], out=out[0])
    else:
        torch.matmul(weight, x, out=out)
    return out


def _add_outer(acc: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> None:
    """``acc += sum over the batch of left[b] @ right[b].T`` for ``(b, *, M)`` batches."""
    for index in range(left.shape[0]):
        acc.addmm_(left[index], right[index].t())


def _relu_(grad: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
    """ReLU backward in place: ``grad`` where the ReLU's output ``result`` is positive, else zero."""
    return torch.ops.aten.threshold_backward.grad_input(grad, result, 0, grad_input=grad)


class _Mapping:
    """The first BatchNorm and the first layer of the mapping once the first batch statistics are known.

    ``act(chunk)`` is ``relu(bn1(relation))`` of the feature channels of a chunk, ``pos_act`` that of the position
    channels (one for all samples), and ``hidden(chunk, act)`` the first layer's output less a shift.
    """

    def __init__(
            self,
            x1: torch.Tensor,
            x2: torch.Tensor,
            position: torch.Tensor,
            bn1_scale: torch.Tensor,
            bn1_shift: torch.Tensor,
            weight1: torch.Tensor,
            bias1: Optional[torch.Tensor],
            kernel_size: int,
            workspace: _Workspace,
    ):
        batch, planes, height, width = x1.shape
        k = kernel_size
        self.planes, self.kernel_size, self.workspace = planes, k, workspace
        scale, shift = bn1_scale[:planes].view(1, planes, 1, 1), bn1_shift[:planes].view(1, planes, 1, 1)
        self.centre = (x1 * scale + shift).view(batch, planes, 1, 1, height, width)
        self.windows = footprint_view(reflect_pad(x2 * scale, k // 2), k)
        self.pos_relation = _position_relation(position, k)
        pos_scale, pos_shift = bn1_scale[planes:].view(-1, 1), bn1_shift[planes:].view(-1, 1)
        self.pos_act = torch.relu(self.pos_relation * pos_scale + pos_shift)
        self.weight = weight1[:, :planes].contiguous()
        self.weight_t = self.weight.t().contiguous()
        self.pos_weight = weight1[:, planes:].contiguous()
        # the position channels' share of the first layer is the same for every sample
        pos_hidden = torch.mm(self.pos_weight, self.pos_act)
        if bias1 is not None:
            pos_hidden += bias1.view(-1, 1)
        self.pos_hidden = pos_hidden.view(planes, k, -1)

    def shift_hidden(self, shift: torch.Tensor) -> None:
        """Subtract ``shift`` (per channel) from every later ``hidden``."""
        self.pos_hidden -= shift.view(-1, 1, 1)

    def act(self, chunk: Chunk) -> torch.Tensor:
        """``(b, R, rows * k * H * W)``: feature channels of ``relu(bn1(relation))`` of a chunk (a workspace)."""
        b0, b1, r0, r1 = chunk
        centre, windows = self.centre[b0:b1], self.windows[b0:b1, :, r0:r1]
        act = self.workspace('act', torch.broadcast_shapes(centre.shape, windows.shape))
        return torch.sub(centre, windows, out=act).relu_().view(b1 - b0, self.planes, -1)

    def hidden(self, chunk: Chunk, act: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``(b, R, rows, k * H * W)``: the first layer's output of a chunk, into ``out`` or a workspace."""
        b0, b1, r0, r1 = chunk
        num, rows = b1 - b0, r1 - r0
        if out is None:
            out = self.workspace('hidden', (num, self.planes, rows, act.shape[2] // rows))
        _matmul(self.weight, act, out.view(num, self.planes, -1) if out.is_contiguous() else out.flatten(2))
        return out.add_(self.pos_hidden[:, r0:r1])


def pairwise_forward(
        x: torch.Tensor,
        position: torch.Tensor,
        kernel_size: int,
        eps1: float,
        eps2: float,
        params: Sequence[Optional[torch.Tensor]],
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SAM's 1x1 convs, pairwise weight mapping (training-mode BatchNorms), softmax and aggregation.

    Args:
        x: SAM's input ``(B, C_in, H, W)``.
        position: Position encoding ``(1, 2, H, W)`` (conv_p output).
        kernel_size: Footprint side ``k`` (odd).
        eps1: First BatchNorm's epsilon.
        eps2: Second BatchNorm's epsilon.
        params: ``[conv1.weight, conv1.bias, conv2.weight, conv2.bias, conv3.weight, conv3.bias, bn1.weight,
            bn1.bias, map1.weight, map1.bias, bn2.weight, bn2.bias, map2.weight, map2.bias]`` (None: absent).

    Returns:
        ``(out, stats, saved)``: the output ``(B, C, H, W)``; ``[mean1, var1, mean2, var2]`` (unbiased variances,
        for the running statistics); ``[mean1, invstd1, mean2, invstd2]`` for ``pairwise_backward``. Everything
        else is rebuilt in backward.
    """
    check_batch_size(x, kernel_size * kernel_size)
    bn1_weight, bn1_bias, map1_w, map1_b, bn2_weight, bn2_bias, map2_w, map2_b = params[6:]
    x1, x2, x3 = conv1x1_concat(x, params[0:6:2], params[1:6:2])
    batch, planes, height, width = x1.shape
    k, spatial, offsets = kernel_size, height * width, kernel_size * kernel_size
    n = batch * offsets * spatial
    weight2 = map2_w.reshape(map2_w.shape[0], -1)
    weight_planes = weight2.shape[0]
    workspace = _Workspace(x1)

    mean_rel, var_rel = _relation_moments(x1, x2, k, workspace)
    pos_var, pos_mean = torch.var_mean(_position_relation(position, k), dim=1, correction=0)
    mean1, var1 = torch.cat([mean_rel, pos_mean]), torch.cat([var_rel, pos_var])
    invstd1 = torch.rsqrt(var1 + eps1)
    scale1, shift1 = bn_scale_shift(bn1_weight, bn1_bias, mean1, invstd1)
    mapping = _Mapping(x1, x2, position, scale1, shift1, map1_w.reshape(planes, -1), map1_b, k, workspace)

    # the hidden layer less a shift (the first chunk's mean), summed on the fly for the second BatchNorm
    hidden = x1.new_empty((batch, planes, k, k * spatial))
    hidden_shift = linear = square = x1.new_zeros(planes)
    for index, chunk in enumerate(_chunks(batch, planes, k, spatial)):
        b0, b1, r0, r1 = chunk
        chunk_hidden = mapping.hidden(chunk, mapping.act(chunk), hidden[b0:b1, :, r0:r1])
        if index == 0:
            hidden_shift = chunk_hidden.mean((0, 2, 3))
            chunk_hidden -= hidden_shift.view(-1, 1, 1)
            mapping.shift_hidden(hidden_shift)
        chunk_linear, chunk_square = _channel_sums(chunk_hidden.flatten(2))
        linear, square = linear + chunk_linear, square + chunk_square
    var2 = (square - linear * linear / n) / n
    mean2 = hidden_shift + linear / n
    invstd2 = torch.rsqrt(var2 + eps2)
    scale2, shift2 = bn_scale_shift(bn2_weight, bn2_bias, linear / n, invstd2)

    out = x3.new_empty(x3.shape)
    for b0, b1 in _blocks(batch, planes * offsets * spatial):
        num = b1 - b0
        act2 = hidden[b0:b1].view(num, planes, -1)
        act2.mul_(scale2.view(-1, 1)).add_(shift2.view(-1, 1)).relu_()
        logits = _logits(weight2, map2_b, act2, workspace)
        weights = workspace('weights', (num, weight_planes, offsets, spatial))
        torch.ops.aten._softmax.out(logits.view(weights.shape), 2, False, out=weights)
        out[b0:b1] = aggregation(x3[b0:b1], weights, k)

    stats = _running_stats_update(mean1, var1, mean2, var2, n)
    return out, stats, torch.cat([mean1, invstd1, mean2, invstd2])


def pairwise_backward(
        grad_out: torch.Tensor,
        x: torch.Tensor,
        position: torch.Tensor,
        saved: torch.Tensor,
        params: Sequence[Optional[torch.Tensor]],
        kernel_size: int,
        input_grad: bool = True,
) -> Tuple[Optional[torch.Tensor], torch.Tensor, List[Optional[torch.Tensor]]]:
    """Gradients of ``pairwise_forward``: ``(grad_x or None, grad_position, grads of params (None: absent))``."""
    mean1, invstd1, mean2, invstd2 = _split_saved(saved, params)
    bn1_weight, bn1_bias, map1_w, map1_b, bn2_weight, bn2_bias, map2_w, map2_b = params[6:]
    x1, x2, x3 = conv1x1_concat(x, params[0:6:2], params[1:6:2])
    k = kernel_size
    batch, planes, height, width = x1.shape
    spatial, offsets = height * width, k * k
    n = batch * offsets * spatial
    weight2 = map2_w.reshape(map2_w.shape[0], -1)
    weight_planes = weight2.shape[0]
    grad_out = grad_out.contiguous()
    workspace = _Workspace(x1)

    scale1, shift1 = bn_scale_shift(bn1_weight, bn1_bias, mean1, invstd1)
    mapping = _Mapping(x1, x2, position, scale1, shift1, map1_w.reshape(planes, -1), map1_b, k, workspace)
    # hidden rebuilt centred on the second BatchNorm's mean: bn2(hidden) = scale2 * hidden_centred + bias2
    mapping.shift_hidden(mean2)
    scale2 = invstd2 if bn2_weight is None else invstd2 * bn2_weight
    bias2 = torch.zeros_like(mean2) if bn2_bias is None else bn2_bias
    scale2_col, bias2_col = scale2.view(-1, 1), bias2.view(-1, 1)
    weight2_t = weight2.t().contiguous()

    # pass 1, whole samples (the softmax spans the footprint): aggregation and softmax backward, the last
    # layer's gradients, and the reductions of the second BatchNorm's backward
    grad_x3 = x3.new_empty(x3.shape)
    grad_logits = x1.new_empty((batch, weight_planes, offsets, spatial))
    grad_weight2, grad_bias2 = x1.new_zeros(weight2.shape), x1.new_zeros(weight_planes)
    sum_gy2, sum_gy2_hc = x1.new_zeros(planes), x1.new_zeros(planes)
    x3_padded = reflect_pad(x3, k // 2)
    for s0, s1 in _blocks(batch, planes * offsets * spatial):
        num = s1 - s0
        hidden = workspace('block_hidden', (num, planes, k, k * spatial))
        for b0, b1, r0, r1 in _chunks(num, planes, k, spatial):
            chunk = (s0 + b0, s0 + b1, r0, r1)
            mapping.hidden(chunk, mapping.act(chunk), hidden[b0:b1, :, r0:r1])
        hidden = hidden.view(num, planes, -1)
        act2 = torch.mul(hidden, scale2_col, out=workspace('block_act2', hidden.shape))
        act2.add_(bias2_col).relu_()
        logits = _logits(weight2, map2_b, act2, workspace)
        weights = workspace('block_weights', (num, weight_planes, offsets, spatial))
        torch.ops.aten._softmax.out(logits.view(weights.shape), 2, False, out=weights)
        grad_x3[s0:s1] = aggregation_input_grad(grad_out[s0:s1], weights, k)
        block_grad = grad_logits[s0:s1]
        _aggregation_weight_grad_into(x3_padded[s0:s1], grad_out[s0:s1], block_grad, workspace)
        # softmax backward in place
        product = torch.mul(weights, block_grad, out=logits.view(weights.shape))
        block_grad.sub_(product.sum(2, keepdim=True)).mul_(weights)
        block_grad = block_grad.view(num, weight_planes, -1)
        _add_outer(grad_weight2, block_grad, act2)
        grad_bias2 += block_grad.sum((0, 2))
        gy2 = _relu_(_matmul(weight2_t, block_grad, workspace('block_gy2', hidden.shape)), act2)
        sum_gy2 += gy2.sum((0, 2))
        sum_gy2_hc += torch.mul(gy2, hidden, out=act2).sum((0, 2))
    del x3, x3_padded

    # second BatchNorm: grad_hidden = scale2 * gy2 + hidden_centred * coef_hc + coef_const
    coef_hc = (-scale2 * sum_gy2_hc * invstd2 * invstd2 / n).view(-1, 1)
    coef_const = (-scale2 * sum_gy2 / n).view(-1, 1)
    scaled_weight2_t = weight2_t * scale2_col

    # pass 2, footprint rows: the first layer's weight gradient and the first BatchNorm's upstream gradient
    # gy1, kept only as its sum over the footprint (centre) and its scatter onto the neighbours (padded)
    pad = k // 2
    grad_weight1 = x1.new_zeros((planes, planes))
    grad_hidden_pos = x1.new_zeros((planes, k, k * spatial))
    gy1_centre = x1.new_zeros(x1.shape)
    gy1_padded = x1.new_zeros((batch, planes, height + 2 * pad, width + 2 * pad))
    grad_logits = grad_logits.view(batch, weight_planes, k, k * spatial)
    for chunk in _chunks(batch, planes, k, spatial):
        b0, b1, r0, r1 = chunk
        num, rows = b1 - b0, r1 - r0
        act = mapping.act(chunk)
        hidden = mapping.hidden(chunk, act).view(num, planes, -1)
        act2 = torch.mul(hidden, scale2_col, out=workspace('act2', hidden.shape)).add_(bias2_col)
        chunk_grad_logits = workspace('grad_logits', (num, weight_planes, rows, k * spatial))
        chunk_grad_logits.copy_(grad_logits[b0:b1, :, r0:r1])
        grad_hidden = _matmul(
            scaled_weight2_t, chunk_grad_logits.view(num, weight_planes, -1),
            workspace('grad_hidden', hidden.shape))
        _relu_(grad_hidden, act2).addcmul_(hidden, coef_hc).add_(coef_const)
        _add_outer(grad_weight1, grad_hidden, act)
        grad_hidden_pos[:, r0:r1] += (grad_hidden[0] if num == 1 else grad_hidden.sum(0)).view(planes, rows, -1)
        gy1 = _relu_(_matmul(mapping.weight_t, grad_hidden, workspace('gy1', hidden.shape)), act)
        gy1 = gy1.view(num, planes, rows * k, spatial)
        gy1_centre[b0:b1] += gy1.sum(2).view(num, planes, height, width)
        _scatter_rows(gy1.view(num, planes, rows, k, height, width), gy1_padded[b0:b1, :, r0:], workspace)
    gy1_nbr = reflect_pad_backward(gy1_padded, height, width, pad)
    del grad_logits, gy1_padded
    workspace.buffers.clear()

    # the position channels: one relation for all samples, so their gradients are sums over the batch
    grad_hidden_pos = grad_hidden_pos.view(planes, -1)
    grad_weight1_pos = torch.mm(grad_hidden_pos, mapping.pos_act.t())
    gy1_pos = torch.ops.aten.threshold_backward(
        torch.mm(mapping.pos_weight.t(), grad_hidden_pos), mapping.pos_act, 0)
    pos_centred = mapping.pos_relation - mean1[planes:].view(-1, 1)

    # first BatchNorm's reductions: sum(gy1) and sum(gy1 * (relation - mean1)), the latter from the two maps,
    # both centred on the mean of x2 (the sum does not depend on it) against cancellation
    rel = slice(0, planes)
    x1_centred = x1 - mean1[rel].view(1, -1, 1, 1)
    mean_x2 = x2.mean((0, 2, 3), keepdim=True)
    sum_gy1 = torch.cat([gy1_centre.sum((0, 2, 3)), gy1_pos.sum(1)])
    sum_gy1_d = torch.cat([
        (gy1_centre * (x1_centred - mean_x2)).sum((0, 2, 3)) - (gy1_nbr * (x2 - mean_x2)).sum((0, 2, 3)),
        (gy1_pos * pos_centred).sum(1),
    ])
    # grad_relation = scale1 * (gy1 - mean(gy1) - (relation - mean1) * coef1)
    mean_gy1 = sum_gy1 / n
    coef1 = sum_gy1_d * invstd1 * invstd1 / n

    # feature channels: grad_relation summed over the footprint (x1) and scattered to the neighbours (x2)
    def col(t: torch.Tensor) -> torch.Tensor:
        return t[rel].view(1, -1, 1, 1)

    counts = _read_counts(height, width, k, x1)
    relation_centre = x1_centred * offsets - _box_sum(x2, k)
    relation_nbr = _box_scatter(x1_centred, k) - x2 * counts
    grad_x1 = col(scale1) * (gy1_centre - col(mean_gy1) * offsets - col(coef1) * relation_centre)
    grad_x2 = col(scale1) * (col(mean_gy1) * counts + col(coef1) * relation_nbr - gy1_nbr)

    # position channels, summed over the batch; then the gradient of p[c] - p[nbr]
    pos = slice(planes, planes + 2)
    grad_pos_relation = scale1[pos].view(-1, 1) * (
        gy1_pos - batch * mean_gy1[pos].view(-1, 1) - batch * coef1[pos].view(-1, 1) * pos_centred)
    grad_pos_relation = grad_pos_relation.view(1, 2, offsets, spatial)
    grad_position = (grad_pos_relation.sum(2).view(1, 2, height, width)
                     - footprint_backward(grad_pos_relation, height, width, k))

    grad_x, grad_convs = conv1x1_concat_backward(
        [grad_x1, grad_x2, grad_x3], x, params[0:6:2], params[1:6:2], input_grad)

    grad_mapping = [
        sum_gy1_d * invstd1 if bn1_weight is not None else None,
        sum_gy1 if bn1_bias is not None else None,
        torch.cat([grad_weight1, grad_weight1_pos], dim=1).view(map1_w.shape),
        grad_hidden_pos.sum(1) if map1_b is not None else None,
        sum_gy2_hc * invstd2 if bn2_weight is not None else None,
        sum_gy2 if bn2_bias is not None else None,
        grad_weight2.view(map2_w.shape),
        grad_bias2 if map2_b is not None else None,
    ]
    return grad_x, grad_position, grad_convs + grad_mapping


def _footprint_moments(x2: torch.Tensor, kernel_size: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Mean and biased variance over batch and map of each ``(channel, offset)`` footprint channel, ``(C, k * k)``.

    Each is a sum over one ``H x W`` window of the batch-summed padded map (and of its square), all ``k * k``
    windows read off float64 integral images: no footprint-sized tensor, and no cancellation to speak of in
    ``E[x^2] - E[x]^2`` at that precision.
    """
    batch, planes, height, width = x2.shape
    k = kernel_size
    n = batch * height * width
    padded = reflect_pad(x2, k // 2).double()
    sums = []
    for values in (padded, padded * padded):
        integral = F.pad(values.sum(0).cumsum(1).cumsum(2), (1, 0, 1, 0))
        windows = (integral[:, height:height + k, width:width + k] - integral[:, :k, width:width + k]
                   - integral[:, height:height + k, :k] + integral[:, :k, :k])
        sums.append(windows.reshape(planes, k * k))
    mean = sums[0] / n
    var = (sums[1] / n - mean * mean).clamp_min_(0)
    return mean.to(x2.dtype), var.to(x2.dtype)


def _place_windows(values: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``(C, H + k - 1, W + k - 1)``: each offset's per-channel value ``values[:, kh, kw]`` added over its window."""
    planes, k = values.shape[0], values.shape[1]
    canvas = values.new_zeros((planes, height + k - 1, width + k - 1))
    for kh in range(k):
        for kw in range(k):
            canvas[:, kh:kh + height, kw:kw + width] += values[:, kh, kw].view(-1, 1, 1)
    return canvas


class _Footprint:
    """The first BatchNorm and first layer of the patchwise mapping once the first batch statistics are known.

    ``act(chunk)`` is ``relu(bn1(x2 over the footprint))`` of a chunk of footprint rows (one affine map per
    ``(channel, offset)``); ``centre_act`` that of the centre channels.
    """

    def __init__(
            self,
            x1: torch.Tensor,
            x2: torch.Tensor,
            bn1_scale: torch.Tensor,
            bn1_shift: torch.Tensor,
            weight1: torch.Tensor,
            kernel_size: int,
            workspace: _Workspace,
    ):
        planes, k = x1.shape[1], kernel_size
        self.planes, self.kernel_size, self.workspace = planes, k, workspace
        scale, shift = bn1_scale[:planes].view(1, -1, 1, 1), bn1_shift[:planes].view(1, -1, 1, 1)
        self.centre_act = torch.relu(x1 * scale + shift)
        self.windows = footprint_view(reflect_pad(x2, k // 2), k)
        self.scale = bn1_scale[planes:].view(1, planes, k, k, 1, 1)
        self.shift = bn1_shift[planes:].view(1, planes, k, k, 1, 1)
        self.centre_weight = weight1[:, :planes].contiguous()
        self.weight = weight1[:, planes:].reshape(-1, planes, k, k)

    def act(self, chunk: Chunk) -> torch.Tensor:
        """``(b, R, rows, k, H, W)`` (a workspace)."""
        b0, b1, r0, r1 = chunk
        windows, scale, shift = self.windows[b0:b1, :, r0:r1], self.scale[:, :, r0:r1], self.shift[:, :, r0:r1]
        out = self.workspace('act', windows.shape)
        return torch.addcmul(shift, windows, scale, out=out).relu_()

    def row_weight(self, chunk: Chunk) -> torch.Tensor:
        """The first layer's columns of a chunk's footprint rows, ``(Cw, R * rows * k)``."""
        return self.weight[:, :, chunk[2]:chunk[3]].reshape(self.weight.shape[0], -1)


def patchwise_forward(
        x: torch.Tensor,
        kernel_size: int,
        eps1: float,
        eps2: float,
        params: Sequence[Optional[torch.Tensor]],
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """SAM's 1x1 convs, patchwise weight mapping (training-mode BatchNorms) and aggregation.

    Args:
        x: SAM's input ``(B, C_in, H, W)``.
        kernel_size: Footprint side ``k`` (odd).
        eps1: First BatchNorm's epsilon.
        eps2: Second BatchNorm's epsilon.
        params: As ``pairwise_forward`` takes them.

    Returns:
        ``(out, stats, saved, hidden)``: as ``pairwise_forward``, and the (map-sized) hidden layer of the mapping,
        which ``patchwise_backward`` takes too.
    """
    check_batch_size(x, 1)
    bn1_weight, bn1_bias, map1_w, map1_b, bn2_weight, bn2_bias, map2_w, map2_b = params[6:]
    x1, x2, x3 = conv1x1_concat(x, params[0:6:2], params[1:6:2])
    batch, planes, height, width = x1.shape
    k, spatial, offsets = kernel_size, height * width, kernel_size * kernel_size
    n = batch * spatial
    weight1 = map1_w.reshape(map1_w.shape[0], -1)
    weight2 = map2_w.reshape(map2_w.shape[0], -1)
    weight_planes = weight1.shape[0]
    workspace = _Workspace(x1)

    centre_var, centre_mean = torch.var_mean(x1, dim=(0, 2, 3), correction=0)
    foot_mean, foot_var = _footprint_moments(x2, k)
    mean1, var1 = torch.cat([centre_mean, foot_mean.flatten()]), torch.cat([centre_var, foot_var.flatten()])
    invstd1 = torch.rsqrt(var1 + eps1)
    scale1, shift1 = bn_scale_shift(bn1_weight, bn1_bias, mean1, invstd1)
    foot = _Footprint(x1, x2, scale1, shift1, weight1, k, workspace)

    # the first layer sums over the footprint: accumulated chunk by chunk
    hidden = torch.matmul(foot.centre_weight, foot.centre_act.view(batch, planes, spatial))
    if map1_b is not None:
        hidden += map1_b.view(-1, 1)
    for chunk in _chunks(batch, planes, k, spatial):
        act = foot.act(chunk).view(chunk[1] - chunk[0], -1, spatial)
        _add_product(hidden[chunk[0]:chunk[1]], foot.row_weight(chunk), act)
    var2, mean2 = torch.var_mean(hidden, dim=(0, 2), correction=0)
    invstd2 = torch.rsqrt(var2 + eps2)
    scale2, shift2 = bn_scale_shift(bn2_weight, bn2_bias, mean2, invstd2)
    act2 = torch.relu(hidden * scale2.view(-1, 1) + shift2.view(-1, 1))

    out = x3.new_empty(x3.shape)
    for b0, b1 in _blocks(batch, weight_planes * offsets * spatial):
        weights = _logits(weight2, map2_b, act2[b0:b1], workspace).view(b1 - b0, weight_planes, offsets, spatial)
        out[b0:b1] = aggregation(x3[b0:b1], weights, k)

    stats = _running_stats_update(mean1, var1, mean2, var2, n)
    return out, stats, torch.cat([mean1, invstd1, mean2, invstd2]), hidden


def patchwise_backward(
        grad_out: torch.Tensor,
        x: torch.Tensor,
        hidden: torch.Tensor,
        saved: torch.Tensor,
        params: Sequence[Optional[torch.Tensor]],
        kernel_size: int,
        eps1: float,
        eps2: float,
        input_grad: bool = True,
) -> Tuple[Optional[torch.Tensor], List[Optional[torch.Tensor]]]:
    """Gradients of ``patchwise_forward``: ``(grad_x or None, grads of params (None: absent))``; the norms' eps
    are those of the forward (``saved`` holds their inverse deviations already)."""
    mean1, invstd1, mean2, invstd2 = _split_saved(saved, params)
    bn1_weight, bn1_bias, map1_w, map1_b, bn2_weight, bn2_bias, map2_w, map2_b = params[6:]
    x1, x2, x3 = conv1x1_concat(x, params[0:6:2], params[1:6:2])
    k = kernel_size
    batch, planes, height, width = x1.shape
    spatial, offsets, pad = height * width, k * k, k // 2
    n = batch * spatial
    weight1 = map1_w.reshape(map1_w.shape[0], -1)
    weight2 = map2_w.reshape(map2_w.shape[0], -1)
    weight_planes = weight1.shape[0]
    grad_out = grad_out.contiguous()
    workspace = _Workspace(x1)

    # aggregation, last layer and second BatchNorm: map-sized, whole samples a block at a time
    scale2 = invstd2 if bn2_weight is None else invstd2 * bn2_weight
    hidden_hat = (hidden - mean2.view(-1, 1)) * invstd2.view(-1, 1)
    act2 = hidden_hat * bn2_weight.view(-1, 1) if bn2_weight is not None else hidden_hat.clone()
    if bn2_bias is not None:
        act2 += bn2_bias.view(-1, 1)
    act2.relu_()
    grad_x3 = x3.new_empty(x3.shape)
    grad_act2 = torch.empty_like(act2)
    grad_weight2, grad_bias2 = x1.new_zeros(weight2.shape), x1.new_zeros(weight2.shape[0])
    x3_padded = reflect_pad(x3, pad)
    for b0, b1 in _blocks(batch, weight_planes * offsets * spatial):
        num = b1 - b0
        weights = _logits(weight2, map2_b, act2[b0:b1], workspace).view(num, weight_planes, offsets, spatial)
        grad_x3[b0:b1] = aggregation_input_grad(grad_out[b0:b1], weights, k)
        grad_weights = workspace('block_grad', weights.shape)
        _aggregation_weight_grad_into(x3_padded[b0:b1], grad_out[b0:b1], grad_weights, workspace)
        grad_weights = grad_weights.view(num, -1, spatial)
        _add_outer(grad_weight2, grad_weights, act2[b0:b1])
        grad_bias2 += grad_weights.sum((0, 2))
        _matmul(weight2.t(), grad_weights, grad_act2[b0:b1])
    del x3, x3_padded
    gy2 = _relu_(grad_act2, act2)
    sum_gy2, sum_gy2_hat = gy2.sum((0, 2)), (gy2 * hidden_hat).sum((0, 2))
    grad_hidden = (gy2 - (sum_gy2 / n).view(-1, 1) - hidden_hat * (sum_gy2_hat / n).view(-1, 1))
    grad_hidden *= scale2.view(-1, 1)

    scale1, shift1 = bn_scale_shift(bn1_weight, bn1_bias, mean1, invstd1)
    foot = _Footprint(x1, x2, scale1, shift1, weight1, k, workspace)

    # centre channels of the first BatchNorm: map-sized
    centre = slice(0, planes)
    centre_act = foot.centre_act.view(batch, planes, spatial)
    grad_weight1_centre = x1.new_zeros((weight_planes, planes))
    _add_outer(grad_weight1_centre, grad_hidden, centre_act)
    gy1 = _relu_(torch.matmul(foot.centre_weight.t(), grad_hidden), centre_act).view(x1.shape)
    x1_hat = (x1 - mean1[centre].view(1, -1, 1, 1)) * invstd1[centre].view(1, -1, 1, 1)
    sum_gy1_centre, sum_gy1_hat_centre = gy1.sum((0, 2, 3)), (gy1 * x1_hat).sum((0, 2, 3))
    grad_x1 = scale1[centre].view(1, -1, 1, 1) * (
        gy1 - (sum_gy1_centre / n).view(1, -1, 1, 1) - x1_hat * (sum_gy1_hat_centre / n).view(1, -1, 1, 1))

    # footprint channels, one pass over footprint rows: the first layer's gradient, the BatchNorm reductions
    # per (channel, offset), and scale1 * gy1 scattered back onto the padded x2 (the BatchNorm's other terms
    # are per-channel constants and x2 itself on each offset's window: placed after the pass)
    foot_scale = scale1[planes:].view(1, planes, k, k, 1, 1)
    mean_x2 = x2.mean((0, 2, 3), keepdim=True)
    centred_windows = footprint_view(reflect_pad(x2 - mean_x2, pad), k)
    grad_weight1_foot = x1.new_zeros((weight_planes, planes, k, k))
    sum_gy1, sum_gy1_x2 = x1.new_zeros((planes, k, k)), x1.new_zeros((planes, k, k))
    canvas = x1.new_zeros((batch, planes, height + 2 * pad, width + 2 * pad))
    for chunk in _chunks(batch, planes, k, spatial):
        b0, b1, r0, r1 = chunk
        num, rows = b1 - b0, r1 - r0
        act = foot.act(chunk)
        act_flat = act.view(num, -1, spatial)
        row_weight = foot.row_weight(chunk)
        for index in range(num):
            grad_weight1_foot[:, :, r0:r1] += torch.mm(
                grad_hidden[b0 + index], act_flat[index].t()).view(weight_planes, planes, rows, k)
        gy1 = _relu_(_matmul(row_weight.t(), grad_hidden[b0:b1], workspace('gy1', act_flat.shape)), act_flat)
        gy1 = gy1.view(act.shape)
        sum_gy1[:, r0:r1] += gy1.sum((0, 4, 5))
        product = torch.mul(gy1, centred_windows[b0:b1, :, r0:r1], out=workspace('product', act.shape))
        sum_gy1_x2[:, r0:r1] += product.sum((0, 4, 5))
        _scatter_rows(gy1.mul_(foot_scale[:, :, r0:r1]), canvas[b0:b1, :, r0:], workspace)
    workspace.buffers.clear()

    foot_mean = mean1[planes:].view(planes, k, k)
    foot_invstd = invstd1[planes:].view(planes, k, k)
    foot_scale = foot_scale.view(planes, k, k)
    sum_gy1_hat = foot_invstd * (sum_gy1_x2 - (foot_mean - mean_x2.view(-1, 1, 1)) * sum_gy1)
    coef = foot_scale * sum_gy1_hat * foot_invstd / n
    # grad_relation = scale * (gy1 - mean(gy1) - (x2[nbr] - mean) * coef), summed onto the padded map
    canvas -= _place_windows(foot_scale * sum_gy1 / n - coef * foot_mean, height, width)
    canvas -= reflect_pad(x2, pad) * _place_windows(coef, height, width)
    grad_x2 = reflect_pad_backward(canvas, height, width, pad)

    grad_x, grad_convs = conv1x1_concat_backward(
        [grad_x1, grad_x2, grad_x3], x, params[0:6:2], params[1:6:2], input_grad)
    sum_gy1_all = torch.cat([sum_gy1_centre, sum_gy1.flatten()])
    grad_mapping = [
        torch.cat([sum_gy1_hat_centre, sum_gy1_hat.flatten()]) if bn1_weight is not None else None,
        sum_gy1_all if bn1_bias is not None else None,
        torch.cat([grad_weight1_centre, grad_weight1_foot.view(weight_planes, -1)], dim=1).view(map1_w.shape),
        grad_hidden.sum((0, 2)) if map1_b is not None else None,
        sum_gy2_hat if bn2_weight is not None else None,
        sum_gy2 if bn2_bias is not None else None,
        grad_weight2.view(map2_w.shape),
        grad_bias2 if map2_b is not None else None,
    ]
    return grad_x, grad_convs + grad_mapping


def _add_product(acc: torch.Tensor, weight: torch.Tensor, x: torch.Tensor) -> None:
    """``acc[b] += weight @ x[b]`` for a ``(b, K, M)`` batch."""
    for index in range(x.shape[0]):
        acc[index].addmm_(weight, x[index])


def _logits(
        weight: torch.Tensor, bias: Optional[torch.Tensor], act: torch.Tensor, workspace: _Workspace,
) -> torch.Tensor:
    """The mapping's last layer of a block, ``(b, C_out, M)`` (a workspace)."""
    out = _matmul(weight, act, workspace('logits', (act.shape[0], weight.shape[0], act.shape[2])))
    if bias is not None:
        out += bias.view(-1, 1)
    return out


def _split_saved(saved: torch.Tensor, params: Sequence[Optional[torch.Tensor]]) -> List[torch.Tensor]:
    """``[mean1, invstd1, mean2, invstd2]`` from the forward's ``saved``; sizes from the mapping's weights."""
    map1_w, map2_w = params[8], params[12]
    assert map1_w is not None and map2_w is not None
    planes1, planes2 = map1_w.shape[1], map1_w.shape[0]
    return list(saved.split([planes1, planes1, planes2, planes2]))
