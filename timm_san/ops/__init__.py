""" SAN's operators: PyTorch custom ops in the ``timm_san`` namespace, and the switch that picks their kernels

The network (``timm_san.san``, ``timm_san.sam``) calls these and nothing below them:
    * ``pairwise_attention`` / ``patchwise_attention``: a whole SAM from its input and parameters;
    * ``footprint``, ``subtraction``, ``subtraction2``, ``aggregation``: the official release's gather and aggregate
      operators, which the attention's reference is written with;
    * ``position_grid``: the coordinates of the pairwise position encoding;
    * ``conv1x1``, ``max_pool2x2``, ``stem``: the network's 1x1 convs and 2x2 max-pools, and its stem (conv,
      BatchNorm, ReLU, pool).

Which kernel computes a call (reference, CPU, Triton) is decided in one place, ``dispatch.select_kernel``, and
switched with ``set_kernels`` / ``use_kernels`` or ``TIMM_SAN_KERNELS`` (see ``timm_san.ops.dispatch``).
"""
from . import flops  # noqa: F401  (FLOP formulas for torch's FlopCounterMode)
from .attention import ATTENTION_PARAMS, PAIR_RELATIONS, PATCH_RELATIONS, attention_params, pairwise_attention, \
    patchwise_attention
from .dispatch import BACKENDS, enabled_kernels, select_kernel, set_kernels, use_kernels
from .pointwise import conv1x1, max_pool2x2, stem
from .primitives import aggregation, footprint, position_grid, subtraction, subtraction2

__all__ = [
    'pairwise_attention', 'patchwise_attention', 'ATTENTION_PARAMS', 'PAIR_RELATIONS', 'PATCH_RELATIONS',
    'attention_params', 'footprint', 'subtraction', 'subtraction2', 'aggregation', 'position_grid', 'conv1x1',
    'max_pool2x2', 'stem', 'BACKENDS', 'set_kernels', 'use_kernels', 'enabled_kernels', 'select_kernel',
]
