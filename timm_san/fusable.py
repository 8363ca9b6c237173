""" Which modules an eval-mode fusion of SAN may compute without calling them

A fusion replaces module calls by arithmetic on the modules' tensors (read per call, so later changes to the
weights or statistics count). It is only equivalent while the modules are the standard ones it was written for:
after module surgery (timm's ``freeze_batch_norm_2d`` swaps in ``FrozenBatchNorm2d``, a replaced activation, a
conv with padding), with a module left in training mode, or with hooks that expect to be called, the module path
runs instead.
"""
from typing import Optional, Tuple, Union

import torch
import torch.nn as nn
from timm.layers import DropPath

__all__ = [
    'EVAL_FUSION_DEVICES', 'fusions_apply', 'needs_grad', 'plain_conv1x1', 'eval_batch_norm', 'train_batch_norm',
    'plain_relu', 'plain_max_pool2x2', 'identity_in_eval',
]

# Device types the eval fusions run on. They trade kernel launches for cache reuse, which pays on a CPU; on an H200
# the plain modules (cuDNN plus the Triton operators) were faster (benchmarks/official_gpu.py, README).
EVAL_FUSION_DEVICES = ('cpu',)


def fusions_apply(x: torch.Tensor) -> bool:
    """Whether the eval fusions may compute on ``x``: a device of ``EVAL_FUSION_DEVICES``, no autocast, no compiler.

    Under autocast the modules cast their inputs per layer; the fusions' ``out=`` arithmetic keeps one dtype.
    Under torch.compile, Inductor fuses the plain modules itself (and its functionalization refuses the fusions'
    writes into views of one buffer). An FX trace records the fused functions (leaves that run on any device): a
    traced input has no device yet.
    """
    if torch.fx._symbolic_trace.is_fx_symbolic_tracing():
        return True
    return (
        x.device.type in EVAL_FUSION_DEVICES
        and not torch.is_autocast_enabled(x.device.type)
        and not torch.compiler.is_compiling()
    )


def needs_grad(*tensors: Optional[torch.Tensor]) -> bool:
    """Whether autograd records a call on ``tensors`` (None entries ignored): fused ``out=`` paths then step aside."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _pair(value: Union[int, Tuple[int, ...]]) -> Tuple[int, ...]:
    return (value, value) if isinstance(value, int) else tuple(value)


def _unhooked(module: nn.Module) -> bool:
    return not (module._forward_hooks or module._forward_pre_hooks)


def plain_conv1x1(module: nn.Module) -> bool:
    """An ``nn.Conv2d`` computing a per-pixel linear map (1x1 kernel, no stride, padding, dilation or groups)."""
    return (
        type(module) is nn.Conv2d
        and _unhooked(module)
        and _pair(module.kernel_size) == (1, 1)
        and _pair(module.stride) == (1, 1)
        and module.padding in ((0, 0), 0, 'valid')
        and _pair(module.dilation) == (1, 1)
        and module.groups == 1
    )


def eval_batch_norm(module: nn.Module) -> bool:
    """An ``nn.BatchNorm2d`` in eval mode normalising with its running statistics (a fixed affine map)."""
    return (
        type(module) is nn.BatchNorm2d
        and _unhooked(module)
        and not module.training
        and module.running_mean is not None
        and module.running_var is not None
    )


def train_batch_norm(module: nn.Module) -> bool:
    """An affine ``nn.BatchNorm2d`` in training mode that normalises with batch statistics and keeps running ones."""
    return (
        type(module) is nn.BatchNorm2d
        and _unhooked(module)
        and module.training
        and module.affine
        and module.track_running_stats
        and module.running_mean is not None
        and module.running_var is not None
    )


def plain_relu(module: nn.Module) -> bool:
    """An ``nn.ReLU``."""
    return type(module) is nn.ReLU and _unhooked(module)


def plain_max_pool2x2(module: nn.Module) -> bool:
    """An ``nn.MaxPool2d`` over 2x2 windows with stride 2, no padding or dilation, floor mode, no indices."""
    return (
        type(module) is nn.MaxPool2d
        and _unhooked(module)
        and _pair(module.kernel_size) == (2, 2)
        and _pair(module.stride) == (2, 2)
        and _pair(module.padding) == (0, 0)
        and _pair(module.dilation) == (1, 1)
        and not module.ceil_mode
        and not module.return_indices
    )


def identity_in_eval(module: nn.Module) -> bool:
    """An ``nn.Identity``, or a ``DropPath`` in eval mode (which returns its input)."""
    return _unhooked(module) and (type(module) is nn.Identity or (type(module) is DropPath and not module.training))
