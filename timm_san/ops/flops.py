""" FLOP formulas of SAN's operators for ``torch.utils.flop_counter.FlopCounterMode``

The counter sees an operator as one call; these count its convolutions (two FLOPs per multiply-add) as the
counter counts ``nn.Conv2d``. The attention's element-wise arithmetic (relation, softmax, aggregation) is not
counted, as the counter does not count element-wise operators.
"""
from typing import Sequence

import torch
from torch.utils.flop_counter import register_flop_formula

from . import attention, pointwise  # noqa: F401  (registers the operators)

__all__ = []


def _conv_flops(pixels: int, in_planes: int, out_planes: int) -> int:
    return 2 * pixels * in_planes * out_planes


@register_flop_formula([torch.ops.timm_san.conv1x1, torch.ops.timm_san.stem])
def _pointwise_flops(x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
    return _conv_flops(x_shape[0] * x_shape[2] * x_shape[3], x_shape[1], w_shape[0])


def _attention_flops(x_shape, param_shapes: Sequence, offsets: int, pairwise: bool) -> int:
    pixels = x_shape[0] * x_shape[2] * x_shape[3]
    projections = sum(_conv_flops(pixels, x_shape[1], param_shapes[i][0]) for i in (0, 2, 4))
    # pairwise maps every footprint offset through every layer; patchwise maps the centre's footprint once
    mapped = pixels * offsets if pairwise else pixels
    return projections + sum(_conv_flops(mapped, shape[1], shape[0]) for shape in param_shapes[8::4])


@register_flop_formula(torch.ops.timm_san.pairwise_attention)
def _pairwise_flops(x_shape, param_shapes, running_shapes, position_shape, kernel_size, *args, out_shape=None,
                    **kwargs) -> int:
    return _attention_flops(x_shape, param_shapes, kernel_size * kernel_size, pairwise=True)


@register_flop_formula(torch.ops.timm_san.patchwise_attention)
def _patchwise_flops(x_shape, param_shapes, running_shapes, kernel_size, *args, out_shape=None, **kwargs) -> int:
    return _attention_flops(x_shape, param_shapes, kernel_size * kernel_size, pairwise=False)
