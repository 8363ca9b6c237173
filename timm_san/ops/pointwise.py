""" SAN's 1x1 convs and 2x2 max-pools as PyTorch custom ops, and the stem of an inference model as one op

    ``conv1x1``        ``conv2d`` with a 1x1 kernel (on CPU, tiles of pixels in the compiled kernels, else batched
                       matmuls, forward and backward)
    ``max_pool2x2``    ``max_pool2d(x, 2, 2)`` (on CPU, two elementwise maxima of strided views, no indices)
    ``stem``           ``max_pool2d(relu(batch_norm(conv2d(x))), 2, 2)`` (on CPU, the BatchNorm folded into the
                       conv and one pass that writes only the pooled map; its batch statistics in training come from
                       the input's moments, its backward recomputes it)

Each has a reference (the PyTorch functional), a fake kernel and registered autograd; ``select_kernel`` picks.
"""
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from timm.layers import register_notrace_function
from torch.library import custom_op

from ..kernels.common import bn_scale_shift, input_moments
from ..kernels.cpp import pointwise as cpp_pointwise
from ..kernels.cpu import conv1x1 as cpu_conv1x1, stem_eval, stem_train
from .dispatch import autocast_enabled, inline_reference, outside_autocast, select_kernel
from .grads import owned_grads, vjp_present

__all__ = ['conv1x1', 'max_pool2x2', 'stem']

_CPU = ('cpu',)
_CPP_CPU = ('cpp', 'cpu')


def _pooled_shape(x: torch.Tensor, planes: int):
    return x.shape[0], planes, x.shape[2] // 2, x.shape[3] // 2


# --- 1x1 conv

@custom_op('timm_san::conv1x1', mutates_args=())
@outside_autocast
def _conv1x1(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    kernel = select_kernel('conv1x1', x, backends=_CPP_CPU)
    if kernel == 'cpp':
        out = cpp_pointwise.conv1x1(x, weight, bias)
    elif kernel != 'reference':
        out = cpu_conv1x1.conv1x1(x, weight, bias)
    else:
        out = F.conv2d(x, weight, bias)
    # never a view (an empty batch's conv may return one): the block adds the residual to it in place
    return out if out._base is None else out.clone()


@_conv1x1.register_fake
def _(x, weight, bias):
    return x.new_empty((x.shape[0], weight.shape[0], x.shape[2], x.shape[3]))


@custom_op('timm_san::conv1x1_backward', mutates_args=())
@outside_autocast
def _conv1x1_backward(
        grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, input_grad: bool) -> List[torch.Tensor]:
    """``[grad_x (empty unless asked), grad_weight, grad_bias]``."""
    # the weight gradient sums over samples in the tensors' dtype: matmuls in float32 / float64 only
    kernel = select_kernel('conv1x1_backward', x, training=True, backends=_CPP_CPU)
    if kernel == 'cpp':
        grad_x, grad_weight, grad_bias = cpp_pointwise.conv1x1_backward(grad, x, weight, input_grad)
    elif kernel != 'reference':
        grad_x, grad_weight, grad_bias = cpu_conv1x1.conv1x1_backward(grad, x, weight, input_grad)
    else:
        grad_x, grad_weight, grad_bias = torch.ops.aten.convolution_backward(
            grad.contiguous(), x, weight, None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1, [input_grad, True, True])
    return [x.new_empty(0) if grad_x is None else grad_x, grad_weight, grad_bias]


@_conv1x1_backward.register_fake
def _(grad, x, weight, input_grad):
    return [torch.empty_like(x) if input_grad else x.new_empty(0), torch.empty_like(weight),
            weight.new_empty(weight.shape[0])]


def _conv1x1_setup(ctx, inputs, output) -> None:
    x, weight, bias = inputs
    ctx.save_for_backward(x, weight)
    ctx.has_bias = bias is not None


def _conv1x1_grad(ctx, grad):
    x, weight = ctx.saved_tensors
    grad_x, grad_weight, grad_bias = _conv1x1_backward(grad, x, weight, ctx.needs_input_grad[0])
    return (grad_x if ctx.needs_input_grad[0] else None), grad_weight, (grad_bias if ctx.has_bias else None)


_conv1x1.register_autograd(_conv1x1_grad, setup_context=_conv1x1_setup)


# --- 2x2 max-pool

def _max_pool2x2_cpu(x: torch.Tensor) -> torch.Tensor:
    # MaxPool2d on NCHW CPU maps computes indices too and is several times slower; row pairs first, so that both
    # operands are runs of whole rows
    height, width = x.shape[-2] // 2 * 2, x.shape[-1] // 2 * 2
    rows = torch.maximum(x[..., 0:height:2, :width], x[..., 1:height:2, :width])
    return torch.maximum(rows[..., 0::2], rows[..., 1::2])


@custom_op('timm_san::max_pool2x2', mutates_args=())
@outside_autocast
def _max_pool2x2(x: torch.Tensor) -> torch.Tensor:
    kernel = select_kernel('max_pool2x2', x, backends=_CPP_CPU)
    if kernel == 'cpp':
        return cpp_pointwise.max_pool2x2(x)
    if kernel == 'cpu':
        return _max_pool2x2_cpu(x)
    return F.max_pool2d(x, 2, 2)


@_max_pool2x2.register_fake
def _(x):
    return x.new_empty(_pooled_shape(x, x.shape[1]))


@custom_op('timm_san::max_pool2x2_backward', mutates_args=())
@outside_autocast
def _max_pool2x2_backward(grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    # MaxPool2d's gradient (one winner per window, the first on ties), the winners found again from the input
    if select_kernel('max_pool2x2_backward', x, training=True, backends=('cpp',)) == 'cpp':
        return cpp_pointwise.max_pool2x2_backward(grad, x)
    _, indices = F.max_pool2d(x, 2, 2, return_indices=True)
    return torch.ops.aten.max_pool2d_with_indices_backward(grad, x, [2, 2], [2, 2], [0, 0], [1, 1], False, indices)


_max_pool2x2_backward.register_fake(lambda grad, x: torch.empty_like(x))


def _max_pool2x2_setup(ctx, inputs, output) -> None:
    ctx.save_for_backward(inputs[0])


def _max_pool2x2_grad(ctx, grad):
    x, = ctx.saved_tensors
    return _max_pool2x2_backward(grad, x)


_max_pool2x2.register_autograd(_max_pool2x2_grad, setup_context=_max_pool2x2_setup)


# --- the stem: conv, BatchNorm, ReLU, max-pool

def _stem_reference(
        x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], bn_weight: Optional[torch.Tensor],
        bn_bias: Optional[torch.Tensor], running_mean: Optional[torch.Tensor], running_var: Optional[torch.Tensor],
        eps: float, batch_stats: bool,
) -> torch.Tensor:
    y = F.conv2d(x, weight, bias)
    y = F.batch_norm(
        y, None if batch_stats else running_mean, None if batch_stats else running_var, bn_weight, bn_bias,
        batch_stats, 0.0, eps)
    return F.max_pool2d(torch.relu(y), 2, 2)


def _stem_stats(
        x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], running_mean: Optional[torch.Tensor],
        running_var: Optional[torch.Tensor]) -> torch.Tensor:
    """``[mean, unbiased var]`` of the conv's output per channel, from the input's moments (3 channels: the
    full-resolution map is not needed for them); the running statistics for an empty batch."""
    planes = weight.shape[0]
    if x.numel() == 0:
        return torch.cat([x.new_zeros(planes) if running_mean is None else running_mean.to(x.dtype),
                          x.new_ones(planes) if running_var is None else running_var.to(x.dtype)])
    matrix = weight.reshape(planes, -1)
    mean_in, covariance = input_moments(x)
    mean = matrix @ mean_in if bias is None else matrix @ mean_in + bias
    pixels = x.numel() // x.shape[1]
    var = ((matrix @ covariance) * matrix).sum(1) * (pixels / max(pixels - 1, 1))
    return torch.cat([mean, var])


def _stem_kernel(x: torch.Tensor, bias: Optional[torch.Tensor], bn_weight: Optional[torch.Tensor],
                 bn_bias: Optional[torch.Tensor], batch_stats: bool) -> Tuple[str, str]:
    """``(mode, backend)``: mode ``'train'`` (a training kernel: a bias-free conv, an affine norm), ``'eval'`` or
    ``'reference'``; backend ``'cpp'`` or ``'cpu'`` for the first two."""
    kernel = select_kernel('stem', x, training=batch_stats, backends=_CPP_CPU)
    if kernel == 'reference':
        return 'reference', kernel
    if not batch_stats:
        return 'eval', kernel
    trainable = bias is None and bn_weight is not None and bn_bias is not None
    return ('train', kernel) if trainable else ('reference', 'reference')


@custom_op('timm_san::stem', mutates_args=())
@outside_autocast
def _stem(
        x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], bn_weight: Optional[torch.Tensor],
        bn_bias: Optional[torch.Tensor], running_mean: Optional[torch.Tensor], running_var: Optional[torch.Tensor],
        eps: float, batch_stats: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(pooled map, batch statistics (empty on running statistics), winning phases (CPU training, else empty))``."""
    stats = _stem_stats(x, weight, bias, running_mean, running_var) if batch_stats else x.new_empty(0)
    mode, backend = _stem_kernel(x, bias, bn_weight, bn_bias, batch_stats)
    if mode == 'train':
        assert bn_weight is not None and bn_bias is not None
        train = cpp_pointwise if backend == 'cpp' else stem_train
        out, argmax = train.stem_forward(x, weight, bn_weight, bn_bias, eps)
        return out, stats, argmax
    if mode == 'eval':
        assert running_mean is not None and running_var is not None
        scale, shift = bn_scale_shift(bn_weight, bn_bias, running_mean, torch.rsqrt(running_var + eps))
        if bias is not None:
            shift = shift + bias * scale
        # scaling the weights (not the pooled output) keeps the maximum right for negative scales
        matrix = weight.reshape(weight.shape[0], -1) * scale.view(-1, 1)
        pooled = cpp_pointwise.stem_eval if backend == 'cpp' else stem_eval.pooled_linear_relu
        return pooled(x, matrix, shift), stats, x.new_empty(0, dtype=torch.uint8)
    out = _stem_reference(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, eps, batch_stats)
    return out, stats, x.new_empty(0, dtype=torch.uint8)


@_stem.register_fake
def _(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, eps, batch_stats):
    out_shape = _pooled_shape(x, weight.shape[0])
    train = _stem_kernel(x, bias, bn_weight, bn_bias, batch_stats)[0] == 'train'
    return (x.new_empty(out_shape), x.new_empty(2 * weight.shape[0] if batch_stats else 0),
            x.new_empty(out_shape if train else (0,), dtype=torch.uint8))


@custom_op('timm_san::stem_backward', mutates_args=())
@outside_autocast
def _stem_backward(
        grad: torch.Tensor, x: torch.Tensor, out: torch.Tensor, argmax: torch.Tensor, weight: torch.Tensor,
        bias: Optional[torch.Tensor], bn_weight: Optional[torch.Tensor], bn_bias: Optional[torch.Tensor],
        running_mean: Optional[torch.Tensor], running_var: Optional[torch.Tensor], eps: float, batch_stats: bool,
        input_grad: bool,
) -> List[torch.Tensor]:
    """``[grad_x, grad_weight, grad_bias, grad_bn_weight, grad_bn_bias]``, empty for absent tensors. Without the
    training kernel's winning phases, the stem is recomputed (nothing of full resolution is kept in between)."""
    inputs = [x, weight, bias, bn_weight, bn_bias]
    if argmax.numel():
        assert bn_weight is not None
        # either training kernel's winners serve either backward
        kernel = select_kernel('stem_backward', x, training=True, backends=('cpp',))
        train = cpp_pointwise if kernel == 'cpp' else stem_train
        grad_x, grad_weight, grad_bn_weight, grad_bn_bias = train.stem_backward(
            grad, x, out, argmax, weight, bn_weight, eps, input_grad)
        grads = [grad_x, grad_weight, None, grad_bn_weight, grad_bn_bias]
    else:
        _, pullback = vjp_present(
            lambda *tensors: _stem_reference(*tensors, running_mean, running_var, eps, batch_stats), inputs)
        grads = pullback(grad)
    return owned_grads(x, grads)


@_stem_backward.register_fake
def _(grad, x, out, argmax, weight, bias, bn_weight, bn_bias, running_mean, running_var, eps, batch_stats, input_grad):
    return [x.new_empty(0) if t is None else torch.empty_like(t) for t in (x, weight, bias, bn_weight, bn_bias)]


def _stem_setup(ctx, inputs, output) -> None:
    x, weight, bias, bn_weight, bn_bias, running_mean, running_var, eps, batch_stats = inputs
    ctx.arguments = (eps, batch_stats)
    # the module folds the batch statistics into the running ones in place: keep those only when they are read
    running = (None, None) if batch_stats else (running_mean, running_var)
    ctx.save_for_backward(x, output[0], output[2], weight, bias, bn_weight, bn_bias, *running)


def _stem_grad(ctx, grad, grad_stats, grad_argmax):
    x, out, argmax, weight, bias, bn_weight, bn_bias, running_mean, running_var = ctx.saved_tensors
    grads = _stem_backward(
        grad, x, out, argmax, weight, bias, bn_weight, bn_bias, running_mean, running_var, *ctx.arguments,
        bool(ctx.needs_input_grad[0]))
    tensors = (x, weight, bias, bn_weight, bn_bias)
    return (*[None if t is None else g for t, g in zip(tensors, grads)], None, None, None, None)


_stem.register_autograd(_stem_grad, setup_context=_stem_setup)


# --- the public functions

@register_notrace_function
def conv1x1(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``F.conv2d(x, weight, bias)`` for a ``(O, C, 1, 1)`` weight.

    Args:
        x: Tensor of shape ``(B, C, H, W)``.
        weight: Conv weight ``(O, C, 1, 1)``.
        bias: Conv bias ``(O,)`` or None.

    Returns:
        Tensor of shape ``(B, O, H, W)``.
    """
    if not torch.jit.is_scripting():
        if inline_reference() or autocast_enabled(x) or x.dim() != 4 or x.dtype != weight.dtype:
            # ONNX; autocast, which picks the conv's dtype; what PyTorch's own conv has a message for
            return F.conv2d(x, weight, bias)
    return torch.ops.timm_san.conv1x1(x, weight, bias)


@register_notrace_function
def max_pool2x2(x: torch.Tensor) -> torch.Tensor:
    """``F.max_pool2d(x, 2, 2)`` (floor mode: an odd last row or column is dropped).

    Args:
        x: Tensor of shape ``(B, C, H, W)``.

    Returns:
        Tensor of shape ``(B, C, H // 2, W // 2)``.
    """
    if not torch.jit.is_scripting():
        if inline_reference() or x.dim() != 4:
            # ONNX, which takes standard operators; and what PyTorch's own pool has a message for
            return F.max_pool2d(x, 2, 2)
    return torch.ops.timm_san.max_pool2x2(x)


@register_notrace_function
def stem(
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: Optional[torch.Tensor],
        bn_weight: Optional[torch.Tensor],
        bn_bias: Optional[torch.Tensor],
        running_mean: Optional[torch.Tensor],
        running_var: Optional[torch.Tensor],
        eps: float,
        batch_stats: bool,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """SAN's stem and first pool: ``max_pool2d(relu(batch_norm(conv2d(x, weight, bias))), 2, 2)``, 1x1 conv.

    Args:
        x: Input images ``(B, C, H, W)``.
        weight: Conv weight ``(O, C, 1, 1)``.
        bias: Conv bias ``(O,)`` or None.
        bn_weight: The BatchNorm's weight ``(O,)`` or None.
        bn_bias: Its bias ``(O,)`` or None.
        running_mean: Its running mean, or None where it keeps none.
        running_var: Its running variance, or None.
        eps: Its epsilon.
        batch_stats: Whether it normalises with batch statistics (training).

    Returns:
        ``(out, stats)``: the pooled map ``(B, O, H // 2, W // 2)``, and the batch's ``[mean, unbiased var]``
        where ``batch_stats`` (empty otherwise), for the BatchNorm's running statistics.
    """
    if not torch.jit.is_scripting():
        if x.dim() != 4 or x.dtype != weight.dtype or x.shape[1] != weight.shape[1] or inline_reference():
            # what PyTorch's own layers refuse, with their messages; and ONNX, which takes standard operators
            if x.dim() == 3:
                raise ValueError('expected 4D input (got 3D input)')  # as nn.BatchNorm2d says it after the conv
            out = _stem_reference(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, eps, batch_stats)
            return out, x.new_empty(0)
    out, stats, _ = torch.ops.timm_san.stem(
        x, weight, bias, bn_weight, bn_bias, running_mean, running_var, eps, batch_stats)
    return out, stats
