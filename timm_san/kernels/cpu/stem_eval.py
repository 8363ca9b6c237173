""" Eval-mode stem of SAN: 1x1 conv, BatchNorm, ReLU and the first 2x2 max-pool in one pass over a quarter map

The stem runs at full input resolution (64 channels at 224 x 224: 100 MB for a batch of 8 in float32), and the
module path writes and reads that map four times (conv, BatchNorm, ReLU, pool), each time through freshly
allocated memory. In eval mode the BatchNorm is a fixed per-channel affine map, so it folds into the conv's
weights; the ReLU is monotonic, so it commutes with the max-pool and runs on the pooled map. The pool itself is
the maximum over the four phases of each 2x2 window: the conv of one phase is a small matmul whose output is
still in cache when the next phase is compared with it, so only the pooled map is ever written.

The result equals the module path up to float rounding (the BatchNorm is folded into the conv's weights). Where
autograd has to record the call, it is computed as the module path computes it instead, so gradients are the
module path's too. The pooled matmul loop (``pooled_linear_relu``) also serves the training stem
(``timm_san.stem_train``), which folds batch statistics instead and records each window's winning phase.
"""
from typing import Optional

import torch
import torch.nn.functional as F
from timm.layers import register_notrace_function

from .fusable import needs_grad
from .ops_fused import _bn_affine

__all__ = ['pooled_stem']

# elements of one chunk of the pooled output: the four phase products of a chunk stay in a core's L2 cache
_CHUNK_ELEMENTS = 1 << 17


@register_notrace_function
def pooled_stem(
        x: torch.Tensor,
        conv_weight: torch.Tensor,
        bn_weight: Optional[torch.Tensor],
        bn_bias: Optional[torch.Tensor],
        running_mean: torch.Tensor,
        running_var: torch.Tensor,
        eps: float,
        chunk_elements: int = _CHUNK_ELEMENTS,
) -> torch.Tensor:
    """``max_pool2d(relu(batch_norm(conv2d(x))), 2, 2)`` for a 1x1 conv without bias and an eval BatchNorm.

    Args:
        x: Input ``(B, C, H, W)``.
        conv_weight: 1x1 conv weight ``(O, C, 1, 1)``.
        bn_weight: BatchNorm weight ``(O,)`` or None.
        bn_bias: BatchNorm bias ``(O,)`` or None.
        running_mean: BatchNorm running mean ``(O,)``.
        running_var: BatchNorm running variance ``(O,)``.
        eps: BatchNorm epsilon.
        chunk_elements: Elements of the pooled output one matmul chunk computes.

    Returns:
        Tensor of shape ``(B, O, H // 2, W // 2)`` (an odd last row or column is dropped, as ``MaxPool2d`` does).
    """
    tensors = [x, conv_weight, bn_weight, bn_bias, running_mean, running_var]
    if needs_grad(*tensors):
        # the fused loop writes through out= (not differentiable); the plain ops also give MaxPool2d's gradient
        y = F.batch_norm(F.conv2d(x, conv_weight), running_mean, running_var, bn_weight, bn_bias, False, 0., eps)
        return F.max_pool2d(torch.relu(y), 2, 2)
    scale, shift = _bn_affine(bn_weight, bn_bias, running_mean, running_var, eps)
    # scaling the weights (not the pooled output) keeps the maximum right for negative BatchNorm scales
    weight = conv_weight.reshape(conv_weight.shape[0], -1) * scale.view(-1, 1)
    return pooled_linear_relu(x, weight, shift, chunk_elements=chunk_elements)


def window_phases(x: torch.Tensor) -> torch.Tensor:
    """Phase ``(dy, dx)`` of every 2x2 window of ``x`` as a ``(B, 4, C, H/2 * W/2)`` copy (phase ``2 * dy + dx``).

    An odd last row or column is left out, as ``MaxPool2d`` leaves it out.
    """
    batch, planes, height, width = x.shape
    pooled_h, pooled_w = height // 2, width // 2
    phases = x[:, :, :2 * pooled_h, :2 * pooled_w].reshape(batch, planes, pooled_h, 2, pooled_w, 2)
    return phases.permute(0, 3, 5, 1, 2, 4).reshape(batch, 4, planes, pooled_h * pooled_w)


def pooled_linear_relu(
        x: torch.Tensor,
        weight: torch.Tensor,
        shift: torch.Tensor,
        argmax: Optional[torch.Tensor] = None,
        chunk_elements: int = _CHUNK_ELEMENTS,
) -> torch.Tensor:
    """``relu(max_pool2d(conv2d(x, weight) + shift, 2, 2))`` for a 1x1 ``weight``, without autograd.

    Args:
        x: Input ``(B, C, H, W)``.
        weight: ``(O, C)`` matrix.
        shift: ``(O,)`` per-channel shift.
        argmax: ``(B, O, H // 2, W // 2)`` uint8 tensor to fill with the phase (``2 * dy + dx``) of each window's
            maximum, the first one on ties (as ``MaxPool2d`` picks it), or None.
        chunk_elements: Elements of the pooled output one matmul chunk computes.

    Returns:
        Tensor of shape ``(B, O, H // 2, W // 2)``.
    """
    batch, out_planes = x.shape[0], weight.shape[0]
    pooled_h, pooled_w = x.shape[2] // 2, x.shape[3] // 2
    spatial = pooled_h * pooled_w
    phases = window_phases(x)
    shift = shift.view(-1, 1)
    out = x.new_empty((batch, out_planes, spatial))
    arg = None if argmax is None else argmax.view(batch, out_planes, spatial)
    cols = max(1, chunk_elements // max(1, out_planes))
    for sample in range(batch):
        for start in range(0, spatial, cols):
            end = min(start + cols, spatial)
            acc = out[sample, :, start:end]
            torch.mm(weight, phases[sample, 0, :, start:end], out=acc)
            if arg is not None:
                arg[sample, :, start:end] = 0
            for phase in range(1, 4):
                product = torch.mm(weight, phases[sample, phase, :, start:end])
                if arg is not None:
                    arg[sample, :, start:end].masked_fill_(product > acc, phase)
                torch.maximum(acc, product, out=acc)
            acc.add_(shift).relu_()
    return out.view(batch, out_planes, pooled_h, pooled_w)
