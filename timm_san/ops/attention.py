""" SAN's self-attention module arithmetic as two PyTorch custom ops: pairwise and patchwise attention

One call computes what SAM computes from its input: the three 1x1 convs, the relation, the weight mapping
(BatchNorm, ReLU, 1x1 conv, BatchNorm, ReLU, 1x1 conv; for pairwise a softmax over the footprint) and the
aggregation. It takes tensors only (the module's parameters and running statistics) and returns the output and,
where a BatchNorm normalises with batch statistics, those statistics, for the module to fold into its running
ones as ``nn.BatchNorm2d`` would (the operator itself writes nothing).

Kernels (chosen by ``timm_san.ops.dispatch.select_kernel``):
    * ``cpp``: the compiled loops of ``timm_san.kernels.cpp``, eval and training (float32/float64): one parallel
      loop per pass over tiles of pixels that stay in a core's cache, nothing ``k * k``-fold in memory;
    * ``triton``: eval on CUDA, one fused kernel per SAM of the same design (``timm_san.kernels.triton.attention``);
    * ``cpu``: eval, the folded mapping a few footprint rows and samples at a time
      (``timm_san.kernels.cpu.attention_eval``); training in float32/float64, forward and backward without
      ``k * k``-fold buffers (``timm_san.kernels.cpu.attention_train``);
    * ``reference``: the modules' arithmetic in stages, the gather and aggregation through the operators of
      ``timm_san.ops.primitives`` (Triton on CUDA). Its backward recomputes the forward and keeps nothing
      ``k * k``-fold between the passes.

Parameters come as one list, ``ATTENTION_PARAMS`` in order (None where a module has no bias), running statistics
as ``[bn1.running_mean, bn1.running_var, bn2.running_mean, bn2.running_var]`` (None where not tracked).
"""
from typing import Callable, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from timm.layers import register_notrace_function
from torch.library import custom_op

from ..kernels import reference, triton as attention_triton
from ..kernels.common import fold_mapping
from ..kernels.cpp import attention as attention_cpp
from ..kernels.cpu import attention_eval, attention_train
from ..kernels.cpu.conv1x1 import conv1x1_split
from . import primitives
from .dispatch import autocast_enabled, inline_reference, outside_autocast, select_kernel
from .grads import owned_grads, vjp_present

__all__ = ['pairwise_attention', 'patchwise_attention', 'ATTENTION_PARAMS']

ATTENTION_PARAMS = (
    'conv1.weight', 'conv1.bias', 'conv2.weight', 'conv2.bias', 'conv3.weight', 'conv3.bias',
    'conv_w.0.weight', 'conv_w.0.bias', 'conv_w.2.weight', 'conv_w.2.bias',
    'conv_w.3.weight', 'conv_w.3.bias', 'conv_w.5.weight', 'conv_w.5.bias',
)
_CONVS = 6

OptionalTensors = List[Optional[torch.Tensor]]
RunningStats = Tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]
# the operators take lists of tensors, an empty tensor standing for an absent one (a list with None in it would not
# be differentiable through a custom op)
Tensors = List[torch.Tensor]


def _with_absent(tensors: List[Optional[torch.Tensor]], like: torch.Tensor) -> Tensors:
    """None entries as empty tensors, as the operators take them."""
    out: List[torch.Tensor] = []
    for t in tensors:
        if t is None:
            out.append(like.new_empty(0))
        else:
            out.append(t)
    return out


def _running_with_absent(running: RunningStats, like: torch.Tensor) -> Tensors:
    return _with_absent([running[0], running[1], running[2], running[3]], like)


def _absent(tensors: Sequence[torch.Tensor]) -> OptionalTensors:
    """The operators' lists as the kernels take them: None for an empty tensor."""
    return [None if t.numel() == 0 else t for t in tensors]


class _Gathers(NamedTuple):
    """The gather and aggregate operators a reference forward is written with."""
    footprint: Callable[[torch.Tensor, int], torch.Tensor]
    subtraction: Callable[[torch.Tensor, int], torch.Tensor]
    subtraction2: Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]
    aggregation: Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]


# inside the kernels: the custom ops (Triton on CUDA); written out for ONNX: the reference's standard operators
_OPERATORS = _Gathers(primitives.footprint, primitives.subtraction, primitives.subtraction2, primitives.aggregation)
_STANDARD = _Gathers(
    reference.footprint, lambda x, k: reference.subtraction2(x, x, k), reference.subtraction2, reference.aggregation)


# --- the reference, in stages: convs, relation, mapping, aggregation

def _project(x: torch.Tensor, convs: Sequence[Optional[torch.Tensor]]) -> List[torch.Tensor]:
    return [F.conv2d(x, convs[i], convs[i + 1]) for i in (0, 2, 4)]


def _batch_moments(
        x: torch.Tensor, running_mean: Optional[torch.Tensor], running_var: Optional[torch.Tensor],
) -> List[torch.Tensor]:
    """Per-channel mean and unbiased variance over all but dim 1, as BatchNorm folds them into running stats.

    An empty batch has none: the running statistics themselves come back (folding them changes nothing, as
    BatchNorm leaves them on an empty batch).
    """
    with torch.no_grad():
        if x.numel() == 0:
            planes = x.shape[1]
            return [x.new_zeros(planes) if running_mean is None else running_mean.to(x.dtype),
                    x.new_ones(planes) if running_var is None else running_var.to(x.dtype)]
        var, mean = torch.var_mean(x.detach(), dim=[0] + list(range(2, x.dim())), correction=1)
    return [mean, var]


def _mapping(
        relation: torch.Tensor, mapping: Sequence[Optional[torch.Tensor]], running: Sequence[Optional[torch.Tensor]],
        eps1: float, eps2: float, batch_stats1: bool, batch_stats2: bool, want_stats: bool,
) -> Tuple[torch.Tensor, List[torch.Tensor]]:
    """``conv(relu(bn2(conv(relu(bn1(relation))))))`` and the batch statistics of the norms that take them."""
    bn1_weight, bn1_bias, map1_weight, map1_bias, bn2_weight, bn2_bias, map2_weight, map2_bias = mapping
    stats: List[torch.Tensor] = []
    normed = F.batch_norm(
        relation, None if batch_stats1 else running[0], None if batch_stats1 else running[1],
        bn1_weight, bn1_bias, batch_stats1, 0.0, eps1)
    if want_stats and batch_stats1:
        stats += _batch_moments(relation, running[0], running[1])
    hidden = F.conv2d(F.relu(normed), map1_weight, map1_bias)
    normed = F.batch_norm(
        hidden, None if batch_stats2 else running[2], None if batch_stats2 else running[3],
        bn2_weight, bn2_bias, batch_stats2, 0.0, eps2)
    if want_stats and batch_stats2:
        stats += _batch_moments(hidden, running[2], running[3])
    return F.conv2d(F.relu(normed), map2_weight, map2_bias), stats


def _pairwise_weights(
        relation: torch.Tensor, position_relation: torch.Tensor, mapping: Sequence[Optional[torch.Tensor]],
        running: Sequence[Optional[torch.Tensor]], eps1: float, eps2: float, batch_stats1: bool, batch_stats2: bool,
        want_stats: bool = False,
) -> Tuple[torch.Tensor, List[torch.Tensor]]:
    relation = torch.cat([relation, position_relation.expand(relation.shape[0], -1, -1, -1)], dim=1)
    logits, stats = _mapping(relation, mapping, running, eps1, eps2, batch_stats1, batch_stats2, want_stats)
    return torch.softmax(logits, dim=2), stats


def _patchwise_weights(
        x1: torch.Tensor, foot: torch.Tensor, mapping: Sequence[Optional[torch.Tensor]],
        running: Sequence[Optional[torch.Tensor]], eps1: float, eps2: float, batch_stats1: bool, batch_stats2: bool,
        want_stats: bool = False,
) -> Tuple[torch.Tensor, List[torch.Tensor]]:
    batch, offsets, spatial = foot.shape[0], foot.shape[2], foot.shape[3]
    # channel-major (c * k * k + offset) footprint after the centre, as the official unfold lays it out
    relation = torch.cat([
        x1.reshape(batch, x1.shape[1], 1, spatial), foot.reshape(batch, foot.shape[1] * offsets, 1, spatial)], dim=1)
    logits, stats = _mapping(relation, mapping, running, eps1, eps2, batch_stats1, batch_stats2, want_stats)
    return logits.reshape(batch, logits.shape[1] // offsets, offsets, spatial), stats


def _stats(stats: List[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    return torch.cat(stats) if stats else like.new_empty(0)


def _pairwise_reference(
        gathers: _Gathers, x: torch.Tensor, params: OptionalTensors, running: OptionalTensors,
        position: torch.Tensor, kernel_size: int, eps1: float, eps2: float, batch_stats1: bool, batch_stats2: bool,
) -> Tuple[torch.Tensor, torch.Tensor]:
    x1, x2, x3 = _project(x, params[:_CONVS])
    weights, stats = _pairwise_weights(
        gathers.subtraction2(x1, x2, kernel_size), gathers.subtraction(position, kernel_size), params[_CONVS:],
        running, eps1, eps2, batch_stats1, batch_stats2, want_stats=True)
    return gathers.aggregation(x3, weights, kernel_size), _stats(stats, x)


def _patchwise_reference(
        gathers: _Gathers, x: torch.Tensor, params: OptionalTensors, running: OptionalTensors,
        kernel_size: int, eps1: float, eps2: float, batch_stats1: bool, batch_stats2: bool,
) -> Tuple[torch.Tensor, torch.Tensor]:
    x1, x2, x3 = _project(x, params[:_CONVS])
    weights, stats = _patchwise_weights(
        x1, gathers.footprint(x2, kernel_size), params[_CONVS:], running, eps1, eps2, batch_stats1, batch_stats2,
        want_stats=True)
    return gathers.aggregation(x3, weights, kernel_size), _stats(stats, x)


def _convs_backward(
        x: torch.Tensor, convs: Sequence[Optional[torch.Tensor]], grads: List[torch.Tensor],
) -> List[Optional[torch.Tensor]]:
    _, pullback = vjp_present(lambda x, *convs: _project(x, convs), [x, *convs])
    return pullback(grads)


def _pairwise_reference_backward(
        grad_out: torch.Tensor, x: torch.Tensor, params: OptionalTensors, running: OptionalTensors,
        position: torch.Tensor, kernel_size: int, eps1: float, eps2: float, batch_stats1: bool, batch_stats2: bool,
) -> List[Optional[torch.Tensor]]:
    """``[grad_x, grad_position, *grad_params]``: the forward recomputed, the mapping differentiated by
    ``torch.func``, the gather and aggregation by their backward operators."""
    height, width = x.shape[2], x.shape[3]
    x1, x2, x3 = _project(x, params[:_CONVS])
    relation = primitives.subtraction2(x1, x2, kernel_size)
    position_relation = primitives.subtraction(position, kernel_size)

    def weights_of(relation, position_relation, *mapping):
        return _pairwise_weights(
            relation, position_relation, mapping, running, eps1, eps2, batch_stats1, batch_stats2)[0]

    weights, pullback = vjp_present(weights_of, [relation, position_relation, *params[_CONVS:]])
    grad_x3, grad_weights = primitives.aggregation_backward(grad_out, x3, weights, kernel_size, True, True)
    grad_relation, grad_position_relation, *grad_mapping = pullback(grad_weights)
    assert grad_relation is not None and grad_position_relation is not None
    grad_x1 = primitives.offset_sum(grad_relation, height, width)
    grad_x2 = primitives.footprint_backward(grad_relation, height, width, kernel_size, True, False)
    grad_position = primitives.footprint_backward(
        grad_position_relation, position.shape[2], position.shape[3], kernel_size, True, True)
    grad_x, *grad_convs = _convs_backward(x, params[:_CONVS], [grad_x1, grad_x2, grad_x3])
    return [grad_x, grad_position, *grad_convs, *grad_mapping]


def _patchwise_reference_backward(
        grad_out: torch.Tensor, x: torch.Tensor, params: OptionalTensors, running: OptionalTensors,
        kernel_size: int, eps1: float, eps2: float, batch_stats1: bool, batch_stats2: bool,
) -> List[Optional[torch.Tensor]]:
    """``[grad_x, *grad_params]``, as ``_pairwise_reference_backward``."""
    height, width = x.shape[2], x.shape[3]
    x1, x2, x3 = _project(x, params[:_CONVS])
    foot = primitives.footprint(x2, kernel_size)

    def weights_of(x1, foot, *mapping):
        return _patchwise_weights(x1, foot, mapping, running, eps1, eps2, batch_stats1, batch_stats2)[0]

    weights, pullback = vjp_present(weights_of, [x1, foot, *params[_CONVS:]])
    grad_x3, grad_weights = primitives.aggregation_backward(grad_out, x3, weights, kernel_size, True, True)
    grad_x1, grad_foot, *grad_mapping = pullback(grad_weights)
    assert grad_x1 is not None and grad_foot is not None
    grad_x2 = primitives.footprint_backward(grad_foot, height, width, kernel_size, False, False)
    grad_x, *grad_convs = _convs_backward(x, params[:_CONVS], [grad_x1, grad_x2, grad_x3])
    return [grad_x, *grad_convs, *grad_mapping]


# --- the operators

def _kernel(op: str, x: torch.Tensor, batch_stats1: bool, batch_stats2: bool) -> str:
    # the CPU kernels fold both norms one way: both with running statistics (eval) or both with batch ones; the
    # fused Triton kernel is eval's (training on CUDA is the reference, with the Triton gather operators)
    backends = ()
    if batch_stats1 == batch_stats2:
        backends = ('cpp', 'cpu') if batch_stats1 else ('cpp', 'cpu', 'triton')
    return select_kernel(op, x, training=batch_stats1, backends=backends)


# A training kernel's state for backward starts with a code naming the kernel that wrote it: backward reads it back
# that way whatever the switch says by then.
_SAVED_BY = {'cpp': 1.0, 'cpu': 2.0}


def _tagged(saved: torch.Tensor, kernel: str) -> torch.Tensor:
    return torch.cat([saved.new_full((1,), _SAVED_BY[kernel]), saved])


def _untagged(saved: torch.Tensor) -> Tuple[str, torch.Tensor]:
    code = saved[0].item()
    return next(k for k, v in _SAVED_BY.items() if v == code), saved[1:]


def _eval_mapping(params: OptionalTensors, running: OptionalTensors) -> OptionalTensors:
    """The mapping's tensors as ``kernels.common.fold_mapping`` takes them (running statistics interleaved)."""
    mapping = params[_CONVS:]
    return [*mapping[0:2], running[0], running[1], *mapping[2:6], running[2], running[3], *mapping[6:8]]


def _eval_projection(x: torch.Tensor, params: OptionalTensors) -> List[torch.Tensor]:
    return conv1x1_split(x, params[0:_CONVS:2], params[1:_CONVS:2])


def _stats_size(params: OptionalTensors, batch_stats1: bool, batch_stats2: bool) -> int:
    map1_weight = params[_CONVS + 2]
    assert map1_weight is not None
    return 2 * map1_weight.shape[1] * batch_stats1 + 2 * map1_weight.shape[0] * batch_stats2


@custom_op('timm_san::pairwise_attention', mutates_args=())
@outside_autocast
def _pairwise_attention(
        x: torch.Tensor, params: Tensors, running: Tensors, position: torch.Tensor,
        kernel_size: int, eps1: float, eps2: float, batch_stats1: bool, batch_stats2: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(out, batch statistics, saved)``; ``saved`` is what the CPU training kernel's backward takes, else empty."""
    params, running = _absent(params), _absent(running)
    kernel = _kernel('pairwise_attention', x, batch_stats1, batch_stats2)
    if kernel in _SAVED_BY and batch_stats1:
        train = attention_cpp if kernel == 'cpp' else attention_train
        out, stats, saved = train.pairwise_forward(x, position, kernel_size, eps1, eps2, params)
        return out, stats, _tagged(saved, kernel)
    if kernel == 'cpp':
        out = attention_cpp.pairwise_eval(x, params, running, position, kernel_size, eps1, eps2)
        return out, x.new_empty(0), x.new_empty(0)
    if kernel == 'triton':
        x1, x2, x3 = _project(x, params[:_CONVS])
        folded = fold_mapping(_eval_mapping(params, running), eps1, eps2)
        return attention_triton.pairwise_eval(x1, x2, x3, position, folded, kernel_size), x.new_empty(0), \
            x.new_empty(0)
    if kernel == 'cpu':
        x1, x2, x3 = _eval_projection(x, params)
        out = attention_eval.pairwise_attention(
            x1, x2, x3, position, _eval_mapping(params, running), eps1, eps2, kernel_size)
        return out, x.new_empty(0), x.new_empty(0)
    out, stats = _pairwise_reference(
        _OPERATORS, x, params, running, position, kernel_size, eps1, eps2, batch_stats1, batch_stats2)
    return out, stats, x.new_empty(0)


@_pairwise_attention.register_fake
def _(x, params, running, position, kernel_size, eps1, eps2, batch_stats1, batch_stats2):
    out = x.new_empty((x.shape[0], params[4].shape[0], x.shape[2], x.shape[3]))
    size = _stats_size(params, batch_stats1, batch_stats2)
    kernel = _kernel('pairwise_attention', x, batch_stats1, batch_stats2)
    saved = size + 1 if batch_stats1 and kernel in _SAVED_BY else 0
    return out, x.new_empty(size), x.new_empty(saved, dtype=torch.float64 if kernel == 'cpp' else x.dtype)


@custom_op('timm_san::pairwise_attention_backward', mutates_args=())
@outside_autocast
def _pairwise_attention_backward(
        grad_out: torch.Tensor, x: torch.Tensor, params: Tensors, running: Tensors,
        position: torch.Tensor, saved: torch.Tensor, kernel_size: int, eps1: float, eps2: float,
        batch_stats1: bool, batch_stats2: bool, input_grad: bool,
) -> List[torch.Tensor]:
    """``[grad_x, grad_position, *grad_params]``, empty where there is no gradient (a missing bias)."""
    params, running = _absent(params), _absent(running)
    if saved.numel():
        kernel, saved = _untagged(saved)
        if kernel == 'cpp':
            grad_x, grad_position, grad_params = attention_cpp.pairwise_backward(
                grad_out, x, position, saved, params, kernel_size, eps1, eps2, input_grad)
        else:
            grad_x, grad_position, grad_params = attention_train.pairwise_backward(
                grad_out, x, position, saved, params, kernel_size, input_grad)
        grads = [grad_x, grad_position, *grad_params]
    else:
        grads = _pairwise_reference_backward(
            grad_out, x, params, running, position, kernel_size, eps1, eps2, batch_stats1, batch_stats2)
    return owned_grads(x, grads)


@_pairwise_attention_backward.register_fake
def _(grad_out, x, params, running, position, saved, kernel_size, eps1, eps2, batch_stats1, batch_stats2, input_grad):
    return [torch.empty_like(x), torch.empty_like(position)] + [
        torch.empty_like(p) for p in params]


def _used_running(running: OptionalTensors, batch_stats1: bool, batch_stats2: bool) -> OptionalTensors:
    """The running statistics a backward reads: not those of norms on batch statistics (the module updates them)."""
    flags = (batch_stats1,) * 2 + (batch_stats2,) * 2
    return [t.new_empty(0) if batch_stats else t for t, batch_stats in zip(running, flags)]


def _pairwise_setup(ctx, inputs, output) -> None:
    x, params, running, position = inputs[:4]
    ctx.arguments = inputs[4:]
    ctx.num_params = len(params)
    ctx.save_for_backward(x, position, output[2], *params, *_used_running(running, *inputs[-2:]))


def _pairwise_grad(ctx, grad_out, grad_stats, grad_saved):
    x, position, saved, *rest = ctx.saved_tensors
    params, running = rest[:ctx.num_params], rest[ctx.num_params:]
    grads = _pairwise_attention_backward(
        grad_out, x, params, running, position, saved, *ctx.arguments, bool(ctx.needs_input_grad[0]))
    grad_params = [None if p.numel() == 0 else g for p, g in zip(params, grads[2:])]
    return grads[0], grad_params, [None] * len(running), grads[1], None, None, None, None, None


_pairwise_attention.register_autograd(_pairwise_grad, setup_context=_pairwise_setup)


@custom_op('timm_san::patchwise_attention', mutates_args=())
@outside_autocast
def _patchwise_attention(
        x: torch.Tensor, params: Tensors, running: Tensors, kernel_size: int, eps1: float,
        eps2: float, batch_stats1: bool, batch_stats2: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(out, batch statistics, saved, hidden)``; the last two are what the CPU training kernel's backward
    takes (its mapping's map-sized hidden layer among them), else empty."""
    params, running = _absent(params), _absent(running)
    kernel = _kernel('patchwise_attention', x, batch_stats1, batch_stats2)
    if kernel in _SAVED_BY and batch_stats1:
        train = attention_cpp if kernel == 'cpp' else attention_train
        out, stats, saved, hidden = train.patchwise_forward(x, kernel_size, eps1, eps2, params)
        return out, stats, _tagged(saved, kernel), hidden
    if kernel == 'cpp':
        out = attention_cpp.patchwise_eval(x, params, running, kernel_size, eps1, eps2)
        return out, x.new_empty(0), x.new_empty(0), x.new_empty(0)
    if kernel == 'triton':
        x1, x2, x3 = _project(x, params[:_CONVS])
        folded = fold_mapping(_eval_mapping(params, running), eps1, eps2)
        return attention_triton.patchwise_eval(x1, x2, x3, folded, kernel_size), x.new_empty(0), x.new_empty(0), \
            x.new_empty(0)
    if kernel == 'cpu':
        x1, x2, x3 = _eval_projection(x, params)
        out = attention_eval.patchwise_attention(x1, x2, x3, _eval_mapping(params, running), eps1, eps2, kernel_size)
        return out, x.new_empty(0), x.new_empty(0), x.new_empty(0)
    out, stats = _patchwise_reference(
        _OPERATORS, x, params, running, kernel_size, eps1, eps2, batch_stats1, batch_stats2)
    return out, stats, x.new_empty(0), x.new_empty(0)


@_patchwise_attention.register_fake
def _(x, params, running, kernel_size, eps1, eps2, batch_stats1, batch_stats2):
    out = x.new_empty((x.shape[0], params[4].shape[0], x.shape[2], x.shape[3]))
    size = _stats_size(params, batch_stats1, batch_stats2)
    kernel = _kernel('patchwise_attention', x, batch_stats1, batch_stats2)
    training_kernel = batch_stats1 and kernel in _SAVED_BY
    hidden_shape = (x.shape[0], params[8].shape[0], x.shape[2] * x.shape[3]) if training_kernel else (0,)
    saved = x.new_empty(size + 1 if training_kernel else 0, dtype=torch.float64 if kernel == 'cpp' else x.dtype)
    return out, x.new_empty(size), saved, x.new_empty(hidden_shape)


@custom_op('timm_san::patchwise_attention_backward', mutates_args=())
@outside_autocast
def _patchwise_attention_backward(
        grad_out: torch.Tensor, x: torch.Tensor, params: Tensors, running: Tensors,
        saved: torch.Tensor, hidden: torch.Tensor, kernel_size: int, eps1: float, eps2: float, batch_stats1: bool,
        batch_stats2: bool, input_grad: bool,
) -> List[torch.Tensor]:
    """``[grad_x, *grad_params]``, empty where there is no gradient (a missing bias)."""
    params, running = _absent(params), _absent(running)
    if saved.numel():
        kernel, saved = _untagged(saved)
        train = attention_cpp if kernel == 'cpp' else attention_train
        grad_x, grad_params = train.patchwise_backward(
            grad_out, x, hidden, saved, params, kernel_size, eps1, eps2, input_grad)
        grads = [grad_x, *grad_params]
    else:
        grads = _patchwise_reference_backward(
            grad_out, x, params, running, kernel_size, eps1, eps2, batch_stats1, batch_stats2)
    return owned_grads(x, grads)


@_patchwise_attention_backward.register_fake
def _(grad_out, x, params, running, saved, hidden, kernel_size, eps1, eps2, batch_stats1, batch_stats2, input_grad):
    return [torch.empty_like(x)] + [torch.empty_like(p) for p in params]


def _patchwise_setup(ctx, inputs, output) -> None:
    x, params, running = inputs[:3]
    ctx.arguments = inputs[3:]
    ctx.num_params = len(params)
    ctx.save_for_backward(x, output[2], output[3], *params, *_used_running(running, *inputs[-2:]))


def _patchwise_grad(ctx, grad_out, grad_stats, grad_saved, grad_hidden):
    x, saved, hidden, *rest = ctx.saved_tensors
    params, running = rest[:ctx.num_params], rest[ctx.num_params:]
    grads = _patchwise_attention_backward(
        grad_out, x, params, running, saved, hidden, *ctx.arguments, bool(ctx.needs_input_grad[0]))
    grad_params = [None if p.numel() == 0 else g for p, g in zip(params, grads[1:])]
    return grads[0], grad_params, [None] * len(running), None, None, None, None, None


_patchwise_attention.register_autograd(_patchwise_grad, setup_context=_patchwise_setup)


# --- the public functions

def _check_arguments(params: OptionalTensors, running: RunningStats, kernel_size: int) -> None:
    reference.check_kernel_size(kernel_size)
    if len(params) != len(ATTENTION_PARAMS) or len(running) != 4:
        raise ValueError(
            f'SAN attention takes {len(ATTENTION_PARAMS)} parameters ({", ".join(ATTENTION_PARAMS)}) and 4 running '
            f'statistics, got {len(params)} and {len(running)}.')


def _in_dtype(x: torch.Tensor, tensors: Sequence[Optional[torch.Tensor]]) -> OptionalTensors:
    """Under autocast the parameters stay float32 while ``x`` may be float16 / bfloat16: compute in ``x``'s dtype."""
    return [t if t is None or t.dtype == x.dtype else t.to(x.dtype) for t in tensors]


@register_notrace_function
def pairwise_attention(
        x: torch.Tensor,
        params: List[Optional[torch.Tensor]],
        running: RunningStats,
        position: torch.Tensor,
        kernel_size: int,
        eps1: float,
        eps2: float,
        batch_stats1: bool,
        batch_stats2: bool,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Pairwise SAM: ``aggregation(conv3(x), softmax(mapping(conv1(x)[c] - conv2(x)[nbr]; p[c] - p[nbr])))``.

    Args:
        x: SAM's input ``(B, C_in, H, W)``.
        params: The module's parameters in ``ATTENTION_PARAMS`` order (None for a missing bias).
        running: ``[bn1.running_mean, bn1.running_var, bn2.running_mean, bn2.running_var]`` (None: not tracked).
        position: The position encoding ``(1, 2, H, W)`` (``conv_p(position_grid(x))``).
        kernel_size: Footprint side ``k`` (odd).
        eps1: The mapping's first BatchNorm's epsilon.
        eps2: Its second BatchNorm's epsilon.
        batch_stats1: Whether the first BatchNorm normalises with batch statistics (training).
        batch_stats2: Whether the second does.

    Returns:
        ``(out, stats)``: the output ``(B, C, H, W)``, and ``[mean, unbiased var]`` of each BatchNorm that took
        batch statistics, concatenated (empty if none did).
    """
    if not torch.jit.is_scripting():
        _check_arguments(params, running, kernel_size)
        if inline_reference():
            return _pairwise_reference(
                _STANDARD, x, params, running, position, kernel_size, eps1, eps2, batch_stats1, batch_stats2)
        if autocast_enabled(x):
            params, running, position = _in_dtype(x, params), _in_dtype(x, running), position.to(x.dtype)
    out, stats, _ = torch.ops.timm_san.pairwise_attention(
        x, _with_absent(params, x), _running_with_absent(running, x), position, kernel_size, eps1, eps2, batch_stats1,
        batch_stats2)
    return out, stats


@register_notrace_function
def patchwise_attention(
        x: torch.Tensor,
        params: List[Optional[torch.Tensor]],
        running: RunningStats,
        kernel_size: int,
        eps1: float,
        eps2: float,
        batch_stats1: bool,
        batch_stats2: bool,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Patchwise SAM: ``aggregation(conv3(x), mapping([conv1(x); conv2(x) over the footprint]))``.

    Args:
        x: SAM's input ``(B, C_in, H, W)``.
        params: The module's parameters in ``ATTENTION_PARAMS`` order (None for a missing bias).
        running: ``[bn1.running_mean, bn1.running_var, bn2.running_mean, bn2.running_var]`` (None: not tracked).
        kernel_size: Footprint side ``k`` (odd).
        eps1: The mapping's first BatchNorm's epsilon.
        eps2: Its second BatchNorm's epsilon.
        batch_stats1: Whether the first BatchNorm normalises with batch statistics (training).
        batch_stats2: Whether the second does.

    Returns:
        ``(out, stats)`` as ``pairwise_attention`` returns them.
    """
    if not torch.jit.is_scripting():
        _check_arguments(params, running, kernel_size)
        if inline_reference():
            return _patchwise_reference(
                _STANDARD, x, params, running, kernel_size, eps1, eps2, batch_stats1, batch_stats2)
        if autocast_enabled(x):
            params, running = _in_dtype(x, params), _in_dtype(x, running)
    out, stats, _, _ = torch.ops.timm_san.patchwise_attention(
        x, _with_absent(params, x), _running_with_absent(running, x), kernel_size, eps1, eps2, batch_stats1, batch_stats2)
    return out, stats
