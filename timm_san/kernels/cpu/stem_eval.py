""" SAN's stem in inference on CPU: 1x1 conv, ReLU and 2x2 max-pool in one pass that writes only the pooled map

The stem runs at full input resolution (64 channels at 224 x 224: 100 MB for a batch of 8 in float32), and the
module path writes and reads that map four times (conv, BatchNorm, ReLU, pool). With the BatchNorm folded into
the conv (``SAN.reparameterize``), the ReLU commutes with the max-pool and runs on the pooled map; the pool is the
maximum over the four phases of each 2x2 window, and the conv of one phase is a small matmul whose output is still
in cache when the next phase is compared with it. Equal to the module path up to float rounding.
"""
from typing import Optional

import torch

__all__ = ['pooled_linear_relu', 'window_phases']

# elements of one chunk of the pooled output: the four phase products of a chunk stay in a core's L2 cache
_CHUNK_ELEMENTS = 1 << 17


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
