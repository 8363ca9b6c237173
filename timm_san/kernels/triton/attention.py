""" SAN's attention in eval on CUDA: one Triton kernel per SAM, the design of the compiled CPU kernels

A program owns a block of pixels of one sample from start to end: for every footprint offset it gathers the
relation (``x1`` at its pixels, ``x2`` and the position at their reflected neighbours), runs the mapping's two
layers as ``tl.dot`` products on the block (the norms folded in), and for pairwise keeps an online softmax
(running maximum and sum per pixel and weight channel) while it aggregates ``x3``; patchwise first sums its first
layer over the footprint's offsets, then maps the hidden layer to each offset's weights as it aggregates. The
output block is written once; nothing ``k * k``-fold leaves the program.

Channel counts are padded to powers of two (of at least 16 for ``tl.dot``'s operands), the padding masked to zero.
Sums run in float32 (float64 for float64 maps), products with ``input_precision='ieee'`` (no TF32). Under
Triton's interpreter (``TRITON_INTERPRET=1``) the kernels run on CPU tensors, which is how the tests check them.
"""
from typing import List

import torch
import triton
import triton.language as tl

from .kernels import _reflect

__all__ = ['pairwise_eval', 'patchwise_eval']

# a program's accumulator holds at most this many elements (pixels x output channels)
_ACC_ELEMENTS = 8192


@triton.jit
def _neighbour(h, w, H, W, dh, dw, period_h, period_w, REPEAT: tl.constexpr):
    return _reflect(h + dh, H, period_h, REPEAT) * W + _reflect(w + dw, W, period_w, REPEAT)


@triton.jit
def pairwise_eval_kernel(
        x1_ptr, x2_ptr, x3_ptr, pos_ptr, scale_ptr, shift_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, out_ptr,
        H, W, period_h, period_w,
        R: tl.constexpr, RP: tl.constexpr, CW: tl.constexpr, CWP: tl.constexpr, G: tl.constexpr, GP: tl.constexpr,
        K: tl.constexpr, REPEAT: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    """out (B, G * CW, H, W) of one block of pixels; w1 (RP + 2, RP): the first layer transposed, its R rows padded
    to RP, then the position's two; w2 (RP, CWP) the second transposed; scale / shift (R + 2) the first norm; b1
    (RP), b2 (CWP)."""
    b = tl.program_id(1).to(tl.int64)
    hw = H * W
    p = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    valid = p < hw
    h, w = p // W, p % W
    r = tl.arange(0, RP)
    o = tl.arange(0, CWP)
    g = tl.arange(0, GP)
    c = g[:, None] * CW + o[None, :]  # (GP, CWP) output channel of each (group, weight channel)
    keep_r = r < R
    keep_c = (g < G)[:, None] & (o < CW)[None, :]
    mask_pr = valid[:, None] & keep_r[None, :]
    scale = tl.load(scale_ptr + r, mask=keep_r, other=0.0).to(ACC)
    shift = tl.load(shift_ptr + r, mask=keep_r, other=0.0).to(ACC)
    # first norm of x1 - x2[n] as (scale * x1 + shift) - scale * x2[n]
    centre = tl.load(x1_ptr + (b * R + r[None, :]) * hw + p[:, None], mask=mask_pr, other=0.0).to(ACC)
    centre = centre * scale[None, :] + shift[None, :]
    w1 = tl.load(w1_ptr + r[:, None] * RP + r[None, :]).to(ACC)
    w1p0 = tl.load(w1_ptr + RP * RP + r).to(ACC)
    w1p1 = tl.load(w1_ptr + (RP + 1) * RP + r).to(ACC)
    b1 = tl.load(b1_ptr + r).to(ACC)
    w2 = tl.load(w2_ptr + r[:, None] * CWP + o[None, :]).to(ACC)
    b2 = tl.load(b2_ptr + o).to(ACC)
    ps0, ps1 = tl.load(scale_ptr + R).to(ACC), tl.load(scale_ptr + R + 1).to(ACC)
    pt0, pt1 = tl.load(shift_ptr + R).to(ACC), tl.load(shift_ptr + R + 1).to(ACC)
    pc0 = tl.load(pos_ptr + p, mask=valid, other=0.0).to(ACC)
    pc1 = tl.load(pos_ptr + hw + p, mask=valid, other=0.0).to(ACC)
    best = tl.full((BLOCK, CWP), float('-inf'), ACC)
    total = tl.zeros((BLOCK, CWP), ACC)
    acc = tl.zeros((BLOCK, GP, CWP), ACC)
    for j in range(K * K):
        n = _neighbour(h, w, H, W, j // K - K // 2, j % K - K // 2, period_h, period_w, REPEAT)
        x2n = tl.load(x2_ptr + (b * R + r[None, :]) * hw + n[:, None], mask=mask_pr, other=0.0).to(ACC)
        rel = tl.maximum(centre - x2n * scale[None, :], 0.0)
        rel = tl.where(keep_r[None, :], rel, 0.0)
        pn0 = tl.load(pos_ptr + n, mask=valid, other=0.0).to(ACC)
        pn1 = tl.load(pos_ptr + hw + n, mask=valid, other=0.0).to(ACC)
        q0 = tl.maximum((pc0 - pn0) * ps0 + pt0, 0.0)
        q1 = tl.maximum((pc1 - pn1) * ps1 + pt1, 0.0)
        hidden = tl.dot(rel, w1, input_precision='ieee') + q0[:, None] * w1p0[None, :] + q1[:, None] * w1p1[None, :]
        hidden = tl.maximum(hidden + b1[None, :], 0.0)
        logit = tl.dot(hidden, w2, input_precision='ieee') + b2[None, :]
        # online softmax over the offsets, the aggregation rescaled with it
        new_best = tl.maximum(best, logit)
        rescale = tl.exp(best - new_best)
        e = tl.exp(logit - new_best)
        total = total * rescale + e
        best = new_best
        x3n = tl.load(x3_ptr + (b * (G * CW) + c[None, :, :]) * hw + n[:, None, None],
                      mask=valid[:, None, None] & keep_c[None, :, :], other=0.0).to(ACC)
        acc = acc * rescale[:, None, :] + e[:, None, :] * x3n
    out = acc / total[:, None, :]
    tl.store(out_ptr + (b * (G * CW) + c[None, :, :]) * hw + p[:, None, None], out.to(out_ptr.dtype.element_ty),
             mask=valid[:, None, None] & keep_c[None, :, :])


@triton.jit
def patchwise_eval_kernel(
        x1_ptr, x2_ptr, x3_ptr, scale_ptr, shift_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, out_ptr,
        H, W, period_h, period_w,
        R: tl.constexpr, RP: tl.constexpr, CW: tl.constexpr, CWP: tl.constexpr, G: tl.constexpr, GP: tl.constexpr,
        K: tl.constexpr, REPEAT: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    """out (B, G * CW, H, W) of one block of pixels; the first layer by chunks: chunk 0 the centre's channels,
    chunk 1 + j offset j's: w1 (K * K + 1, RP, CWP), scale / shift (K * K + 1, RP) the first norm by chunk; w2
    (K * K, CWP, CWP) offset j's rows of the last layer transposed, b2 (K * K, CWP); b1 (CWP)."""
    b = tl.program_id(1).to(tl.int64)
    hw = H * W
    p = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    valid = p < hw
    h, w = p // W, p % W
    r = tl.arange(0, RP)
    o = tl.arange(0, CWP)
    g = tl.arange(0, GP)
    c = g[:, None] * CW + o[None, :]
    keep_r = r < R
    keep_c = (g < G)[:, None] & (o < CW)[None, :]
    mask_pr = valid[:, None] & keep_r[None, :]
    hidden = tl.zeros((BLOCK, CWP), ACC) + tl.load(b1_ptr + o).to(ACC)[None, :]
    for chunk in range(K * K + 1):
        if chunk == 0:
            n = p
            src = x1_ptr
        else:
            n = _neighbour(h, w, H, W, (chunk - 1) // K - K // 2, (chunk - 1) % K - K // 2, period_h, period_w,
                           REPEAT)
            src = x2_ptr
        v = tl.load(src + (b * R + r[None, :]) * hw + n[:, None], mask=mask_pr, other=0.0).to(ACC)
        scale = tl.load(scale_ptr + chunk * RP + r).to(ACC)
        shift = tl.load(shift_ptr + chunk * RP + r).to(ACC)
        rel = tl.where(keep_r[None, :], tl.maximum(v * scale[None, :] + shift[None, :], 0.0), 0.0)
        w1 = tl.load(w1_ptr + (chunk * RP + r[:, None]) * CWP + o[None, :]).to(ACC)
        hidden += tl.dot(rel, w1, input_precision='ieee')
    hidden = tl.maximum(hidden, 0.0)
    acc = tl.zeros((BLOCK, GP, CWP), ACC)
    for j in range(K * K):
        w2 = tl.load(w2_ptr + (j * CWP + o[:, None]) * CWP + o[None, :]).to(ACC)
        weight = tl.dot(hidden, w2, input_precision='ieee') + tl.load(b2_ptr + j * CWP + o).to(ACC)[None, :]
        n = _neighbour(h, w, H, W, j // K - K // 2, j % K - K // 2, period_h, period_w, REPEAT)
        x3n = tl.load(x3_ptr + (b * (G * CW) + c[None, :, :]) * hw + n[:, None, None],
                      mask=valid[:, None, None] & keep_c[None, :, :], other=0.0).to(ACC)
        acc += weight[:, None, :] * x3n
    tl.store(out_ptr + (b * (G * CW) + c[None, :, :]) * hw + p[:, None, None], acc.to(out_ptr.dtype.element_ty),
             mask=valid[:, None, None] & keep_c[None, :, :])


def _pow2(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


def _padded(t: torch.Tensor, shape: List[int]) -> torch.Tensor:
    """``t`` zero-padded at the end of each dim to ``shape`` (contiguous)."""
    out = t.new_zeros(shape)
    out[tuple(slice(0, s) for s in t.shape)] = t
    return out


def _launch_geometry(x1: torch.Tensor, kernel_size: int, channels: int):
    batch, _, height, width = x1.shape
    pad = kernel_size // 2
    block = max(16, min(128, triton.next_power_of_2(max(1, _ACC_ELEMENTS // triton.next_power_of_2(channels)))))
    grid = (triton.cdiv(height * width, block), batch)
    repeat = pad >= height or pad >= width
    return grid, block, max(2 * (height - 1), 1), max(2 * (width - 1), 1), repeat


def _acc(x: torch.Tensor):
    return tl.float64 if x.dtype == torch.float64 else tl.float32


def pairwise_eval(x1: torch.Tensor, x2: torch.Tensor, x3: torch.Tensor, position: torch.Tensor,
                  folded: List[torch.Tensor], kernel_size: int) -> torch.Tensor:
    """Eval pairwise SAM after its convs: ``folded`` is ``[scale, shift, weight1, bias1, weight2, bias2]`` of the
    mapping (``kernels.common.fold_mapping``: the first norm an affine map, the second folded into the first
    layer).

    Args:
        x1: Centre map ``(B, R, H, W)``; x2 the neighbours' ``(B, R, H, W)``; x3 the aggregated ``(B, C, H, W)``.
        position: The position encoding ``(1, 2, H, W)``.
        folded: The folded mapping.
        kernel_size: Footprint side.
    """
    scale, shift, weight1, bias1, weight2, bias2 = folded
    planes, weight_planes, channels = x1.shape[1], weight2.shape[0], x3.shape[1]
    rp, cwp = _pow2(planes), _pow2(weight_planes)
    acc = torch.float64 if x1.dtype == torch.float64 else torch.float32
    w1 = _padded(weight1.t().to(acc), [planes + 2, rp])  # (R + 2, R) transposed
    w1 = torch.cat([_padded(w1[:planes], [rp, rp]), w1[planes:]])  # R rows padded, then the position's two
    w2 = _padded(weight2.t().to(acc), [rp, cwp])
    out = torch.empty_like(x3)
    grid, block, period_h, period_w, repeat = _launch_geometry(x1, kernel_size, channels)
    pairwise_eval_kernel[grid](
        x1.contiguous(), x2.contiguous(), x3.contiguous(), position.contiguous(), scale.to(acc).contiguous(),
        shift.to(acc).contiguous(), w1, _padded(bias1.to(acc), [rp]), w2, _padded(bias2.to(acc), [cwp]), out,
        x1.shape[2], x1.shape[3], period_h, period_w, R=planes, RP=rp, CW=weight_planes, CWP=cwp,
        G=channels // weight_planes, GP=triton.next_power_of_2(channels // weight_planes), K=kernel_size,
        REPEAT=repeat, ACC=_acc(x1), BLOCK=block)
    return out


def patchwise_eval(x1: torch.Tensor, x2: torch.Tensor, x3: torch.Tensor, folded: List[torch.Tensor],
                   kernel_size: int) -> torch.Tensor:
    """Eval patchwise SAM after its convs, ``folded`` as ``pairwise_eval`` takes it (the first layer's columns in
    the official order: the centre's channels, then channel-major ``c * k * k + offset``)."""
    scale, shift, weight1, bias1, weight2, bias2 = folded
    planes, weight_planes, channels = x1.shape[1], weight1.shape[0], x3.shape[1]
    offsets = kernel_size * kernel_size
    rp, cwp = _pow2(planes), _pow2(weight_planes)
    acc = torch.float64 if x1.dtype == torch.float64 else torch.float32
    # by chunk: the centre's columns, then offset j's (channel c at column planes + c * k * k + j)
    def chunked(v: torch.Tensor) -> torch.Tensor:  # (..., R * (k * k + 1)) -> (..., k * k + 1, R)
        centre, foot = v[..., :planes], v[..., planes:].unflatten(-1, (planes, offsets)).transpose(-1, -2)
        return torch.cat([centre.unsqueeze(-2), foot], -2)
    scale_c = _padded(chunked(scale.to(acc)), [offsets + 1, rp])
    shift_c = _padded(chunked(shift.to(acc)), [offsets + 1, rp])
    w1 = _padded(chunked(weight1.to(acc)).permute(1, 2, 0), [offsets + 1, rp, cwp])  # (chunk, R, Cw)
    # the last layer's rows cw * k * k + j: offset j's (Cw, Cw) block, transposed
    w2 = _padded(weight2.to(acc).unflatten(0, (weight_planes, offsets)).permute(1, 2, 0), [offsets, cwp, cwp])
    b2 = _padded(bias2.to(acc).unflatten(0, (weight_planes, offsets)).t(), [offsets, cwp])
    out = torch.empty_like(x3)
    grid, block, period_h, period_w, repeat = _launch_geometry(x1, kernel_size, channels)
    patchwise_eval_kernel[grid](
        x1.contiguous(), x2.contiguous(), x3.contiguous(), scale_c, shift_c, w1, _padded(bias1.to(acc), [cwp]),
        w2, b2, out, x1.shape[2], x1.shape[3], period_h, period_w, R=planes, RP=rp, CW=weight_planes, CWP=cwp,
        G=channels // weight_planes, GP=triton.next_power_of_2(channels // weight_planes), K=kernel_size,
        REPEAT=repeat, ACC=_acc(x1), BLOCK=block)
    return out
