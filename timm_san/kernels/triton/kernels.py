""" Triton kernels of SAN's operators (gather, relation, aggregation), forward and backward

The launchers are in ``timm_san.kernels.triton.launch``; the package imports both only where Triton is installed.

Conventions of every kernel:
    * maps are contiguous ``(B, C, H, W)``, footprint tensors ``(B, C, k * k, H * W)``, aggregation weights
      ``(B, Cw, k * k, H * W)`` with channel ``c`` using weight channel ``c % Cw``;
    * a 1-D grid: the fastest-moving part of the program id is the block of positions, so neighbouring
      programs share the rows of their halos in cache;
    * offsets of whole rows are int64 (``B * C * k * k * H * W`` outgrows int32 at ImageNet sizes), offsets
      inside a map are int32;
    * sums run in ``ACC`` (float32, or float64 for float64 tensors) and are rounded once, at the store;
    * gradients with respect to a map are gathered onto its padded grid (no atomics: each program owns its
      outputs) and folded back onto the map by ``fold_kernel``.

Reflection: ``REPEAT`` is set when a side is not longer than the padding; the index is then reflected
repeatedly (period ``2 * (n - 1)``, a side of one repeats its pixel). Otherwise one reflection suffices and
the kernels skip the integer remainder.
"""
import triton
import triton.language as tl

__all__ = [
    'footprint_kernel', 'aggregation_kernel', 'aggregation_input_grad_kernel', 'aggregation_weight_grad_kernel',
    'footprint_grad_kernel', 'offset_sum_kernel', 'fold_kernel',
]


@triton.jit
def _reflect(t, n, period, REPEAT: tl.constexpr):
    """Index in ``[0, n)`` that position ``t`` (in ``[-pad, n + pad)``) of a reflection-padded side reads."""
    t = tl.abs(t)
    if REPEAT:
        t = t % period
    # for n > 1 the host passes period = 2 * (n - 1), so this is the reflection at the far edge
    return tl.where(t < n, t, period - t)


@triton.jit
def _fold_source(h, n, period, I: tl.constexpr, PAD: tl.constexpr, REPEAT: tl.constexpr):
    """Padded index of candidate ``I`` among the padded positions that reflect onto ``h``, and whether it does.

    Candidate 0 is ``h`` itself; the others are the rows (columns) of the two padding bands: with one
    reflection at most one per band (``-h`` and ``2 * (n - 1) - h``), with repeated reflection any of them.
    """
    if I == 0:
        t = h
        valid = h >= 0
    elif REPEAT:
        # band position I - 1 of 2 * PAD: PAD before the side, PAD after it
        if I - 1 < PAD:
            t = h * 0 + (I - 1 - PAD)
        else:
            t = h * 0 + (n + I - 1 - PAD)
        valid = _reflect(t, n, period, True) == h
    elif I == 1:
        t = -h
        valid = (h >= 1) & (h <= PAD)
    else:
        t = period - h
        valid = (h <= n - 2) & (h >= n - 1 - PAD)
    return t + PAD, valid


@triton.jit
def _row_tile(ROWS, SPATIAL, BLOCK_R: tl.constexpr, BLOCK: tl.constexpr):
    """Rows (``b * C + c``, int64) and positions of this program's tile, with their masks."""
    pid = tl.program_id(0)
    num_blocks = tl.cdiv(SPATIAL, BLOCK)
    rows = (pid // num_blocks) * BLOCK_R + tl.arange(0, BLOCK_R)
    pos = (pid % num_blocks) * BLOCK + tl.arange(0, BLOCK)
    return rows.to(tl.int64), pos, rows < ROWS, pos < SPATIAL


@triton.jit
def footprint_kernel(
        x1_ptr, x2_ptr, out_ptr, ROWS, H, W, period_h, period_w,
        K: tl.constexpr, HAS_X1: tl.constexpr, REPEAT: tl.constexpr, ACC: tl.constexpr, BLOCK_R: tl.constexpr,
        BLOCK: tl.constexpr,
):
    """``out[r, k, p] = x1[r, p] - x2[r, refl(p + offset k)]`` (relation), or ``x2[...]`` alone (footprint)."""
    PAD: tl.constexpr = K // 2
    hw = H * W
    rows, pos, row_mask, pos_mask = _row_tile(ROWS, hw, BLOCK_R, BLOCK)
    mask = row_mask[:, None] & pos_mask[None, :]
    h, w = pos // W, pos % W
    in_rows = (rows * hw)[:, None]
    if HAS_X1:
        centre = tl.load(x1_ptr + in_rows + pos[None, :], mask=mask, other=0.0).to(ACC)
    out = out_ptr + (rows * (K * K) * hw)[:, None] + pos[None, :]
    for kh in range(K):
        src_h = _reflect(h + (kh - PAD), H, period_h, REPEAT)
        for kw in tl.static_range(K):
            src = src_h * W + _reflect(w + (kw - PAD), W, period_w, REPEAT)
            value = tl.load(x2_ptr + in_rows + src[None, :], mask=mask, other=0.0).to(ACC)
            if HAS_X1:
                value = centre - value
            tl.store(out + (kh * K + kw) * hw, value.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def aggregation_kernel(
        x_ptr, weight_ptr, out_ptr, C, CW, H, W, period_h, period_w,
        K: tl.constexpr, REPEAT: tl.constexpr, ACC: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK: tl.constexpr,
):
    """``out[b, c, p] = sum_k weight[b, c % Cw, k, p] * x[b, c, refl(p + offset k)]``.

    A program takes one weight channel ``s`` and a block of the channels sharing it (``s + g * Cw``), so each
    weight value is read once for all of them.
    """
    PAD: tl.constexpr = K // 2
    hw = H * W
    groups = C // CW
    pid = tl.program_id(0)
    num_blocks = tl.cdiv(hw, BLOCK)
    num_group_blocks = tl.cdiv(groups, BLOCK_G)
    rest = pid // num_blocks
    g = (rest % num_group_blocks) * BLOCK_G + tl.arange(0, BLOCK_G)
    rest = rest // num_group_blocks  # b * Cw + s
    b, s = rest // CW, rest % CW
    pos = (pid % num_blocks) * BLOCK + tl.arange(0, BLOCK)
    pos_mask = pos < hw
    mask = (g < groups)[:, None] & pos_mask[None, :]
    h, w = pos // W, pos % W
    x_rows = x_ptr + ((b * C + s + g * CW).to(tl.int64) * hw)[:, None]
    weight_row = weight_ptr + rest.to(tl.int64) * (K * K) * hw
    acc = tl.zeros((BLOCK_G, BLOCK), dtype=ACC)
    for kh in range(K):
        src_h = _reflect(h + (kh - PAD), H, period_h, REPEAT)
        for kw in tl.static_range(K):
            src = src_h * W + _reflect(w + (kw - PAD), W, period_w, REPEAT)
            wt = tl.load(weight_row + (kh * K + kw) * hw + pos, mask=pos_mask, other=0.0).to(ACC)
            value = tl.load(x_rows + src[None, :], mask=mask, other=0.0).to(ACC)
            acc += value * wt[None, :]
    out = out_ptr + ((b * C + s + g * CW).to(tl.int64) * hw)[:, None] + pos[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def aggregation_input_grad_kernel(
        grad_ptr, weight_ptr, out_ptr, C, CW, H, W,
        K: tl.constexpr, ACC: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK: tl.constexpr,
):
    """Gradient of aggregation on the padded grid of ``x``.

    ``out[b, c, q] = sum_k grad[b, c, q - offset k] * weight[b, c % Cw, k, q - offset k]`` over the offsets that
    land inside the map, for every position ``q`` of the ``(H + 2 * pad) x (W + 2 * pad)`` grid.
    """
    PAD: tl.constexpr = K // 2
    hw = H * W
    width_padded = W + 2 * PAD
    hw_padded = (H + 2 * PAD) * width_padded
    groups = C // CW
    pid = tl.program_id(0)
    num_blocks = tl.cdiv(hw_padded, BLOCK)
    num_group_blocks = tl.cdiv(groups, BLOCK_G)
    rest = pid // num_blocks
    g = (rest % num_group_blocks) * BLOCK_G + tl.arange(0, BLOCK_G)
    rest = rest // num_group_blocks  # b * Cw + s
    b, s = rest // CW, rest % CW
    pos = (pid % num_blocks) * BLOCK + tl.arange(0, BLOCK)
    pos_mask = pos < hw_padded
    group_mask = (g < groups)[:, None]
    hp, wp = pos // width_padded, pos % width_padded
    channels = (b * C + s + g * CW).to(tl.int64)
    grad_rows = grad_ptr + (channels * hw)[:, None]
    weight_row = weight_ptr + rest.to(tl.int64) * (K * K) * hw
    acc = tl.zeros((BLOCK_G, BLOCK), dtype=ACC)
    for kh in range(K):
        oh = hp - kh
        row_ok = pos_mask & (oh >= 0) & (oh < H)
        for kw in tl.static_range(K):
            ow = wp - kw
            ok = row_ok & (ow >= 0) & (ow < W)
            src = oh * W + ow
            wt = tl.load(weight_row + (kh * K + kw) * hw + src, mask=ok, other=0.0).to(ACC)
            value = tl.load(grad_rows + src[None, :], mask=group_mask & ok[None, :], other=0.0).to(ACC)
            acc += value * wt[None, :]
    out = out_ptr + (channels * hw_padded)[:, None] + pos[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=group_mask & pos_mask[None, :])


@triton.jit
def aggregation_weight_grad_kernel(
        x_ptr, grad_ptr, out_ptr, C, CW, H, W, period_h, period_w,
        K: tl.constexpr, REPEAT: tl.constexpr, ACC: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK: tl.constexpr,
):
    """``out[b, s, k, p] = sum_g x[b, s + g * Cw, refl(p + offset k)] * grad[b, s + g * Cw, p]``.

    One program owns its outputs and sums every channel group itself, a block of groups at a time.
    """
    PAD: tl.constexpr = K // 2
    hw = H * W
    groups = C // CW
    pid = tl.program_id(0)
    num_blocks = tl.cdiv(hw, BLOCK)
    rest = pid // num_blocks  # b * Cw + s
    b, s = rest // CW, rest % CW
    pos = (pid % num_blocks) * BLOCK + tl.arange(0, BLOCK)
    pos_mask = pos < hw
    h, w = pos // W, pos % W
    out_row = out_ptr + rest.to(tl.int64) * (K * K) * hw
    for kh in range(K):
        src_h = _reflect(h + (kh - PAD), H, period_h, REPEAT)
        for kw in tl.static_range(K):
            src = src_h * W + _reflect(w + (kw - PAD), W, period_w, REPEAT)
            acc = tl.zeros((BLOCK,), dtype=ACC)
            for g0 in range(0, groups, BLOCK_G):
                g = g0 + tl.arange(0, BLOCK_G)
                mask = (g < groups)[:, None] & pos_mask[None, :]
                rows = ((b * C + s + g * CW).to(tl.int64) * hw)[:, None]
                # the gradient tile is the same for every offset: after the first it comes from cache
                grad = tl.load(grad_ptr + rows + pos[None, :], mask=mask, other=0.0).to(ACC)
                value = tl.load(x_ptr + rows + src[None, :], mask=mask, other=0.0).to(ACC)
                acc += tl.sum(value * grad, axis=0)
            tl.store(out_row + (kh * K + kw) * hw + pos, acc.to(out_ptr.dtype.element_ty), mask=pos_mask)


@triton.jit
def footprint_grad_kernel(
        grad_ptr, out_ptr, ROWS, H, W,
        K: tl.constexpr, NEGATE: tl.constexpr, CENTRE: tl.constexpr, ACC: tl.constexpr, BLOCK_R: tl.constexpr,
        BLOCK: tl.constexpr,
):
    """Gradient of the footprint gather on the padded grid: ``out[r, q] = sum_k grad[r, k, q - offset k]``.

    ``NEGATE`` flips the sign (the neighbour term of a relation); ``CENTRE`` adds ``sum_k grad[r, k, q - pad]``
    at the positions of the map itself (the centre term of a map's relation with itself).
    """
    PAD: tl.constexpr = K // 2
    hw = H * W
    width_padded = W + 2 * PAD
    hw_padded = (H + 2 * PAD) * width_padded
    rows, pos, row_mask, pos_mask = _row_tile(ROWS, hw_padded, BLOCK_R, BLOCK)
    row_mask = row_mask[:, None]
    hp, wp = pos // width_padded, pos % width_padded
    grad_rows = grad_ptr + (rows * (K * K) * hw)[:, None]
    acc = tl.zeros((BLOCK_R, BLOCK), dtype=ACC)
    for kh in range(K):
        oh = hp - kh
        row_ok = pos_mask & (oh >= 0) & (oh < H)
        for kw in tl.static_range(K):
            ow = wp - kw
            ok = row_ok & (ow >= 0) & (ow < W)
            src = (kh * K + kw) * hw + oh * W + ow
            acc += tl.load(grad_rows + src[None, :], mask=row_mask & ok[None, :], other=0.0).to(ACC)
    if NEGATE:
        acc = -acc
    if CENTRE:
        ih, iw = hp - PAD, wp - PAD
        inside = row_mask & (pos_mask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W))[None, :]
        for k in range(K * K):
            acc += tl.load(grad_rows + (k * hw + ih * W + iw)[None, :], mask=inside, other=0.0).to(ACC)
    out = out_ptr + (rows * hw_padded)[:, None] + pos[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=row_mask & pos_mask[None, :])


@triton.jit
def offset_sum_kernel(
        grad_ptr, out_ptr, ROWS, HW, NUM_OFFSETS: tl.constexpr, ACC: tl.constexpr, BLOCK_R: tl.constexpr,
        BLOCK: tl.constexpr,
):
    """``out[r, p] = sum_k grad[r, k, p]`` (gradient of a relation with respect to its centre map)."""
    rows, pos, row_mask, pos_mask = _row_tile(ROWS, HW, BLOCK_R, BLOCK)
    mask = row_mask[:, None] & pos_mask[None, :]
    grad = grad_ptr + (rows * NUM_OFFSETS * HW)[:, None] + pos[None, :]
    acc = tl.zeros((BLOCK_R, BLOCK), dtype=ACC)
    for k in range(NUM_OFFSETS):
        acc += tl.load(grad + k * HW, mask=mask, other=0.0).to(ACC)
    tl.store(out_ptr + (rows * HW)[:, None] + pos[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def fold_kernel(
        padded_ptr, out_ptr, ROWS, H, W, period_h, period_w,
        PAD: tl.constexpr, REPEAT: tl.constexpr, ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK: tl.constexpr,
):
    """Gradient of reflection padding: ``out[r, h, w]`` sums ``padded[r, q]`` over the ``q`` reflecting onto it.

    Each output gathers its own sources, so the sum is deterministic (no atomics, unlike
    ``reflection_pad2d_backward`` on CUDA).
    """
    # candidate sources per side: the position itself and the padding bands (one reflection: one per band)
    SOURCES: tl.constexpr = 1 + 2 * PAD if REPEAT else 3
    hw = H * W
    width_padded = W + 2 * PAD
    rows, pos, row_mask, pos_mask = _row_tile(ROWS, hw, BLOCK_R, BLOCK)
    row_mask = row_mask[:, None]
    h, w = pos // W, pos % W
    padded_rows = padded_ptr + (rows * (H + 2 * PAD) * width_padded)[:, None]
    acc = tl.zeros((BLOCK_R, BLOCK), dtype=ACC)
    for i in tl.static_range(SOURCES):
        hp, ok_h = _fold_source(h, H, period_h, i, PAD, REPEAT)
        for j in tl.static_range(SOURCES):
            wp, ok_w = _fold_source(w, W, period_w, j, PAD, REPEAT)
            ok = row_mask & (pos_mask & ok_h & ok_w)[None, :]
            acc += tl.load(padded_rows + (hp * width_padded + wp)[None, :], mask=ok, other=0.0).to(ACC)
    out = out_ptr + (rows * hw)[:, None] + pos[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=row_mask & pos_mask[None, :])
