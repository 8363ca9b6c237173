""" SAN's self-attention module arithmetic as two PyTorch custom ops: pairwise and patchwise attention

One call computes what SAM computes from its input: the three 1x1 convs, the relation, the weight mapping
(per layer BatchNorm, ReLU, 1x1 conv: two layers as released, one to three in the paper's design space; for
pairwise a softmax over the footprint) and the aggregation. It takes tensors only (the module's parameters and
running statistics) and returns the output and, where a BatchNorm normalises with batch statistics, those
statistics, for the module to fold into its running ones as ``nn.BatchNorm2d`` would (the operator itself writes
nothing).

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

Parameters come as one list: the three convs' weights and biases, then per mapping layer its norm's weight and bias
and its conv's weight and bias (``ATTENTION_PARAMS`` for the released two layers; None where a module has none);
running statistics as ``[mean, var]`` per mapping norm (None where not tracked). A relation is a code,
``PAIR_RELATIONS.index(name)`` or ``PATCH_RELATIONS.index(name)``, as the compiled kernels number them. Only the
released configuration (subtraction with the position encoding, concatenation; two mapping layers) has every
kernel; the others run the compiled CPU kernels (pairwise: every relation; patchwise: concatenation) or the
reference, and the dispatch log says which and why.
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

__all__ = ['pairwise_attention', 'patchwise_attention', 'ATTENTION_PARAMS', 'PAIR_RELATIONS', 'PATCH_RELATIONS']

ATTENTION_PARAMS = (
    'conv1.weight', 'conv1.bias', 'conv2.weight', 'conv2.bias', 'conv3.weight', 'conv3.bias',
    'conv_w.0.weight', 'conv_w.0.bias', 'conv_w.2.weight', 'conv_w.2.bias',
    'conv_w.3.weight', 'conv_w.3.bias', 'conv_w.5.weight', 'conv_w.5.bias',
)
_CONVS = 6
# the relations of the paper's Section 3, in the compiled kernels' numbering; the first of each is the released one
PAIR_RELATIONS = ('subtraction', 'summation', 'hadamard', 'concatenation', 'dot')
PATCH_RELATIONS = ('concatenation', 'star', 'clique')
_RELEASED_LAYERS = 2

OptionalTensors = List[Optional[torch.Tensor]]
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
        eps: Sequence[float], batch_stats: Sequence[bool], want_stats: bool,
) -> Tuple[torch.Tensor, List[torch.Tensor]]:
    """Per layer ``conv(relu(bn(.)))`` from the relation up, and the batch statistics of the norms that take them."""
    out, stats = relation, []
    for layer, (layer_eps, layer_batch_stats) in enumerate(zip(eps, batch_stats)):
        norm_weight, norm_bias, conv_weight, conv_bias = mapping[4 * layer:4 * layer + 4]
        mean, var = running[2 * layer], running[2 * layer + 1]
        normed = F.batch_norm(
            out, None if layer_batch_stats else mean, None if layer_batch_stats else var, norm_weight, norm_bias,
            bool(layer_batch_stats), 0.0, layer_eps)
        if want_stats and layer_batch_stats:
            stats += _batch_moments(out, mean, var)
        out = F.conv2d(F.relu(normed), conv_weight, conv_bias)
    return out, stats


def _pair_relation(x1: torch.Tensor, foot: torch.Tensor, relation: int) -> torch.Tensor:
    """``delta(x1 at the pixel, x2 at each neighbour)``: x1 ``(B, R, H, W)``, the footprint of x2
    ``(B, R, k * k, H * W)``; concatenation gives ``2 R`` channels, dot one."""
    centre = x1.reshape(x1.shape[0], x1.shape[1], 1, -1)
    name = PAIR_RELATIONS[relation]
    if name == 'subtraction':
        return centre - foot
    if name == 'summation':
        return centre + foot
    if name == 'hadamard':
        return centre * foot
    if name == 'concatenation':
        return torch.cat([centre.expand_as(foot), foot], dim=1)
    return (centre * foot).sum(dim=1, keepdim=True)


def _pairwise_weights(
        relation: torch.Tensor, position_relation: Optional[torch.Tensor], mapping: Sequence[Optional[torch.Tensor]],
        running: Sequence[Optional[torch.Tensor]], eps: Sequence[float], batch_stats: Sequence[bool],
        want_stats: bool = False,
) -> Tuple[torch.Tensor, List[torch.Tensor]]:
    if position_relation is not None:
        relation = torch.cat([relation, position_relation.expand(relation.shape[0], -1, -1, -1)], dim=1)
    logits, stats = _mapping(relation, mapping, running, eps, batch_stats, want_stats)
    return torch.softmax(logits, dim=2), stats


def _patch_relation(first: torch.Tensor, foot: torch.Tensor, relation: int) -> torch.Tensor:
    """``delta(x_R(i))`` as ``(B, channels, 1, H * W)``: ``first`` is x1 ``(B, R, H, W)``, or for clique its
    footprint; ``foot`` is x2's footprint ``(B, R, k * k, H * W)``."""
    batch, channels, offsets, spatial = foot.shape
    name = PATCH_RELATIONS[relation]
    if name == 'concatenation':
        # channel-major (c * k * k + offset) footprint after the centre, as the official unfold lays it out
        centre = first.reshape(batch, channels, 1, spatial)
        return torch.cat([centre, foot.reshape(batch, channels * offsets, 1, spatial)], dim=1)
    if name == 'star':
        return (first.reshape(batch, channels, 1, spatial) * foot).sum(dim=1).unsqueeze(2)
    # clique: every pair of the footprint, j-major
    return torch.einsum('bcjp,bcmp->bjmp', first, foot).reshape(batch, offsets * offsets, 1, spatial)


def _patchwise_weights(
        first: torch.Tensor, foot: torch.Tensor, relation: int, mapping: Sequence[Optional[torch.Tensor]],
        running: Sequence[Optional[torch.Tensor]], eps: Sequence[float], batch_stats: Sequence[bool],
        want_stats: bool = False,
) -> Tuple[torch.Tensor, List[torch.Tensor]]:
    batch, offsets, spatial = foot.shape[0], foot.shape[2], foot.shape[3]
    logits, stats = _mapping(_patch_relation(first, foot, relation), mapping, running, eps, batch_stats, want_stats)
    return logits.reshape(batch, logits.shape[1] // offsets, offsets, spatial), stats


def _stats(stats: List[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    return torch.cat(stats) if stats else like.new_empty(0)


def _position_relation(gathers: _Gathers, position: Optional[torch.Tensor], kernel_size: int) -> Optional[torch.Tensor]:
    return None if position is None else gathers.subtraction(position, kernel_size)


def _pairwise_relation(gathers: _Gathers, x1: torch.Tensor, x2: torch.Tensor, kernel_size: int, relation: int):
    # the released subtraction through its own gather (one pass, and the official kernel's arithmetic)
    if relation == 0:
        return gathers.subtraction2(x1, x2, kernel_size)
    return _pair_relation(x1, gathers.footprint(x2, kernel_size), relation)


def _pairwise_reference(
        gathers: _Gathers, x: torch.Tensor, params: OptionalTensors, running: OptionalTensors,
        position: Optional[torch.Tensor], kernel_size: int, relation: int, eps: Sequence[float],
        batch_stats: Sequence[bool],
) -> Tuple[torch.Tensor, torch.Tensor]:
    x1, x2, x3 = _project(x, params[:_CONVS])
    weights, stats = _pairwise_weights(
        _pairwise_relation(gathers, x1, x2, kernel_size, relation), _position_relation(gathers, position, kernel_size),
        params[_CONVS:], running, eps, batch_stats, want_stats=True)
    return gathers.aggregation(x3, weights, kernel_size), _stats(stats, x)


def _patchwise_reference(
        gathers: _Gathers, x: torch.Tensor, params: OptionalTensors, running: OptionalTensors,
        kernel_size: int, relation: int, eps: Sequence[float], batch_stats: Sequence[bool],
) -> Tuple[torch.Tensor, torch.Tensor]:
    x1, x2, x3 = _project(x, params[:_CONVS])
    first = gathers.footprint(x1, kernel_size) if PATCH_RELATIONS[relation] == 'clique' else x1
    weights, stats = _patchwise_weights(
        first, gathers.footprint(x2, kernel_size), relation, params[_CONVS:], running, eps, batch_stats,
        want_stats=True)
    return gathers.aggregation(x3, weights, kernel_size), _stats(stats, x)


def _convs_backward(
        x: torch.Tensor, convs: Sequence[Optional[torch.Tensor]], grads: List[torch.Tensor],
) -> List[Optional[torch.Tensor]]:
    _, pullback = vjp_present(lambda x, *convs: _project(x, convs), [x, *convs])
    return pullback(grads)


def _pairwise_reference_backward(
        grad_out: torch.Tensor, x: torch.Tensor, params: OptionalTensors, running: OptionalTensors,
        position: Optional[torch.Tensor], kernel_size: int, relation: int, eps: Sequence[float],
        batch_stats: Sequence[bool],
) -> List[Optional[torch.Tensor]]:
    """``[grad_x, grad_position (None without one), *grad_params]``: the forward recomputed, the mapping (and a
    relation other than the released subtraction) differentiated by ``torch.func``, the gathers and the aggregation
    by their backward operators."""
    height, width = x.shape[2], x.shape[3]
    x1, x2, x3 = _project(x, params[:_CONVS])
    subtraction = relation == 0
    # the released subtraction: differentiate from the relation; the others: from x1 and x2's footprint
    if subtraction:
        inputs = [primitives.subtraction2(x1, x2, kernel_size)]
    else:
        inputs = [x1, primitives.footprint(x2, kernel_size)]
    position_relation = None if position is None else primitives.subtraction(position, kernel_size)

    def weights_of(*tensors):
        pair = tensors[0] if subtraction else _pair_relation(tensors[0], tensors[1], relation)
        rest = tensors[len(inputs):]
        with_position = position_relation is not None
        return _pairwise_weights(
            pair, rest[0] if with_position else None, rest[int(with_position):], running, eps, batch_stats)[0]

    weights, pullback = vjp_present(
        weights_of, [*inputs, *([] if position_relation is None else [position_relation]), *params[_CONVS:]])
    grad_x3, grad_weights = primitives.aggregation_backward(grad_out, x3, weights, kernel_size, True, True)
    grads = pullback(grad_weights)
    if subtraction:
        grad_relation = grads.pop(0)
        assert grad_relation is not None
        grad_x1 = primitives.offset_sum(grad_relation, height, width)
        grad_x2 = primitives.footprint_backward(grad_relation, height, width, kernel_size, True, False)
    else:
        grad_x1, grad_foot = grads.pop(0), grads.pop(0)
        assert grad_x1 is not None and grad_foot is not None
        grad_x2 = primitives.footprint_backward(grad_foot, height, width, kernel_size, False, False)
    grad_position = None
    if position is not None:
        grad_position_relation = grads.pop(0)
        assert grad_position_relation is not None
        grad_position = primitives.footprint_backward(
            grad_position_relation, position.shape[2], position.shape[3], kernel_size, True, True)
    grad_x, *grad_convs = _convs_backward(x, params[:_CONVS], [grad_x1, grad_x2, grad_x3])
    return [grad_x, grad_position, *grad_convs, *grads]


def _patchwise_reference_backward(
        grad_out: torch.Tensor, x: torch.Tensor, params: OptionalTensors, running: OptionalTensors,
        kernel_size: int, relation: int, eps: Sequence[float], batch_stats: Sequence[bool],
) -> List[Optional[torch.Tensor]]:
    """``[grad_x, *grad_params]``, as ``_pairwise_reference_backward``."""
    height, width = x.shape[2], x.shape[3]
    x1, x2, x3 = _project(x, params[:_CONVS])
    clique = PATCH_RELATIONS[relation] == 'clique'
    first = primitives.footprint(x1, kernel_size) if clique else x1
    foot = primitives.footprint(x2, kernel_size)

    def weights_of(first, foot, *mapping):
        return _patchwise_weights(first, foot, relation, mapping, running, eps, batch_stats)[0]

    weights, pullback = vjp_present(weights_of, [first, foot, *params[_CONVS:]])
    grad_x3, grad_weights = primitives.aggregation_backward(grad_out, x3, weights, kernel_size, True, True)
    grad_first, grad_foot, *grad_mapping = pullback(grad_weights)
    assert grad_first is not None and grad_foot is not None
    grad_x1 = primitives.footprint_backward(grad_first, height, width, kernel_size, False, False) if clique \
        else grad_first
    grad_x2 = primitives.footprint_backward(grad_foot, height, width, kernel_size, False, False)
    grad_x, *grad_convs = _convs_backward(x, params[:_CONVS], [grad_x1, grad_x2, grad_x3])
    return [grad_x, *grad_convs, *grad_mapping]


# --- the operators

def _released(relation: int, layers: int, position: Optional[torch.Tensor] = None, pairwise: bool = False) -> bool:
    """Whether a SAM is the official release's configuration, which every backend computes."""
    return relation == 0 and layers == _RELEASED_LAYERS and (position is not None or not pairwise)


def _kernel(op: str, x: torch.Tensor, batch_stats: Sequence[bool], released: bool, compiled: bool = True) -> str:
    # the CPU kernels fold all norms one way: all with running statistics (eval) or all with batch ones; the fused
    # Triton kernel is eval's (training on CUDA is the reference, with the Triton gather operators); the design
    # space's other points have the compiled CPU kernels (where ``compiled``) or the reference
    backends: Tuple[str, ...] = ()
    note = ''
    if all(batch_stats) or not any(batch_stats):
        backends = ('cpp', 'cpu') if batch_stats[0] else ('cpp', 'cpu', 'triton')
    if not released:
        backends = tuple(b for b in backends if b == 'cpp' and compiled)
        note = 'a variant of the design space: ' + (
            'the compiled CPU kernels or the reference serve it' if compiled else 'only the reference serves it')
    return select_kernel(op, x, training=batch_stats[0], backends=backends, note=note)


def _compiled_patchwise(relation: int) -> bool:
    """Whether the compiled CPU kernels compute a patchwise relation (concatenation; star and clique: not yet)."""
    return PATCH_RELATIONS[relation] == 'concatenation'



# A training kernel's state for backward starts with a code naming the kernel that wrote it: backward reads it back
# that way whatever the switch says by then.
_SAVED_BY = {'cpp': 1.0, 'cpu': 2.0}


def _tagged(saved: torch.Tensor, kernel: str) -> torch.Tensor:
    return torch.cat([saved.new_full((1,), _SAVED_BY[kernel]), saved])


def _untagged(saved: torch.Tensor) -> Tuple[str, torch.Tensor]:
    code = saved[0].item()
    return next(k for k, v in _SAVED_BY.items() if v == code), saved[1:]


def _eval_mapping(params: OptionalTensors, running: OptionalTensors) -> OptionalTensors:
    """The released mapping's tensors as ``kernels.common.fold_mapping`` takes them (running statistics
    interleaved)."""
    mapping = params[_CONVS:]
    return [*mapping[0:2], running[0], running[1], *mapping[2:6], running[2], running[3], *mapping[6:8]]


def _eval_projection(x: torch.Tensor, params: OptionalTensors) -> List[torch.Tensor]:
    return conv1x1_split(x, params[0:_CONVS:2], params[1:_CONVS:2])


def _layer_inputs(params: Sequence[Optional[torch.Tensor]]) -> List[int]:
    """The input channels of each mapping layer (its norm's width)."""
    return [w.shape[1] for w in params[_CONVS + 2::4] if w is not None]


def _stats_size(params: OptionalTensors, batch_stats: Sequence[bool]) -> int:
    return sum(2 * planes for planes, flag in zip(_layer_inputs(params), batch_stats) if flag)


def _position(position: torch.Tensor) -> Optional[torch.Tensor]:
    return None if position.numel() == 0 else position


# batch_stats travels through the operators as 0/1 ints: torch.jit.trace cannot record a list of bools
@custom_op('timm_san::pairwise_attention', mutates_args=())
@outside_autocast
def _pairwise_attention(
        x: torch.Tensor, params: Tensors, running: Tensors, position: torch.Tensor, kernel_size: int, relation: int,
        eps: List[float], batch_stats: List[int],
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(out, batch statistics, saved)``; ``saved`` is what the CPU training kernel's backward takes, else empty.
    ``position`` is empty without a position encoding."""
    params, running, position_or_none = _absent(params), _absent(running), _position(position)
    released = _released(relation, len(eps), position_or_none, pairwise=True)
    kernel = _kernel('pairwise_attention', x, batch_stats, released)
    if kernel in _SAVED_BY and batch_stats[0]:
        if kernel == 'cpp':
            out, stats, saved = attention_cpp.pairwise_forward(x, position, kernel_size, relation, eps, params)
        else:
            out, stats, saved = attention_train.pairwise_forward(x, position, kernel_size, eps[0], eps[1], params)
        return out, stats, _tagged(saved, kernel)
    if kernel == 'cpp':
        out = attention_cpp.pairwise_eval(x, params, running, position, kernel_size, relation, eps)
        return out, x.new_empty(0), x.new_empty(0)
    if kernel == 'triton':
        x1, x2, x3 = _project(x, params[:_CONVS])
        folded = fold_mapping(_eval_mapping(params, running), eps[0], eps[1])
        return attention_triton.pairwise_eval(x1, x2, x3, position, folded, kernel_size), x.new_empty(0), \
            x.new_empty(0)
    if kernel == 'cpu':
        x1, x2, x3 = _eval_projection(x, params)
        out = attention_eval.pairwise_attention(
            x1, x2, x3, position, _eval_mapping(params, running), eps[0], eps[1], kernel_size)
        return out, x.new_empty(0), x.new_empty(0)
    out, stats = _pairwise_reference(
        _OPERATORS, x, params, running, position_or_none, kernel_size, relation, eps, batch_stats)
    return out, stats, x.new_empty(0)


@_pairwise_attention.register_fake
def _(x, params, running, position, kernel_size, relation, eps, batch_stats):
    out = x.new_empty((x.shape[0], params[4].shape[0], x.shape[2], x.shape[3]))
    size = _stats_size(params, batch_stats)
    released = _released(relation, len(eps), _position(position), pairwise=True)
    kernel = _kernel('pairwise_attention', x, batch_stats, released)
    saved = size + 1 if batch_stats[0] and kernel in _SAVED_BY else 0
    return out, x.new_empty(size), x.new_empty(saved, dtype=torch.float64 if kernel == 'cpp' and saved else x.dtype)


@custom_op('timm_san::pairwise_attention_backward', mutates_args=())
@outside_autocast
def _pairwise_attention_backward(
        grad_out: torch.Tensor, x: torch.Tensor, params: Tensors, running: Tensors, position: torch.Tensor,
        saved: torch.Tensor, kernel_size: int, relation: int, eps: List[float], batch_stats: List[int],
        input_grad: bool,
) -> List[torch.Tensor]:
    """``[grad_x, grad_position, *grad_params]``, empty where there is no gradient (a missing bias or position)."""
    params, running = _absent(params), _absent(running)
    if saved.numel():
        kernel, saved = _untagged(saved)
        if kernel == 'cpp':
            grad_x, grad_position, grad_params = attention_cpp.pairwise_backward(
                grad_out, x, position, saved, params, kernel_size, relation, eps, input_grad)
        else:
            grad_x, grad_position, grad_params = attention_train.pairwise_backward(
                grad_out, x, position, saved, params, kernel_size, input_grad)
        grads = [grad_x, grad_position, *grad_params]
    else:
        grads = _pairwise_reference_backward(
            grad_out, x, params, running, _position(position), kernel_size, relation, eps, batch_stats)
    return owned_grads(x, grads)


@_pairwise_attention_backward.register_fake
def _(grad_out, x, params, running, position, saved, kernel_size, relation, eps, batch_stats, input_grad):
    return [torch.empty_like(x), torch.empty_like(position)] + [torch.empty_like(p) for p in params]


def _used_running(running: OptionalTensors, batch_stats: Sequence[bool]) -> OptionalTensors:
    """The running statistics a backward reads: not those of norms on batch statistics (the module updates them)."""
    flags = [flag for flag in batch_stats for _ in range(2)]
    return [t.new_empty(0) if flag else t for t, flag in zip(running, flags)]


def _pairwise_setup(ctx, inputs, output) -> None:
    x, params, running, position = inputs[:4]
    ctx.arguments = inputs[4:]
    ctx.num_params = len(params)
    ctx.save_for_backward(x, position, output[2], *params, *_used_running(running, inputs[-1]))


def _pairwise_grad(ctx, grad_out, grad_stats, grad_saved):
    x, position, saved, *rest = ctx.saved_tensors
    params, running = rest[:ctx.num_params], rest[ctx.num_params:]
    grads = _pairwise_attention_backward(
        grad_out, x, params, running, position, saved, *ctx.arguments, bool(ctx.needs_input_grad[0]))
    grad_params = [None if p.numel() == 0 else g for p, g in zip(params, grads[2:])]
    grad_position = None if position.numel() == 0 else grads[1]
    return grads[0], grad_params, [None] * len(running), grad_position, None, None, None, None


_pairwise_attention.register_autograd(_pairwise_grad, setup_context=_pairwise_setup)


@custom_op('timm_san::patchwise_attention', mutates_args=())
@outside_autocast
def _patchwise_attention(
        x: torch.Tensor, params: Tensors, running: Tensors, kernel_size: int, relation: int, eps: List[float],
        batch_stats: List[int],
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(out, batch statistics, saved, hidden)``; the last two are what the CPU training kernel's backward
    takes (its mapping's map-sized hidden layers among them), else empty."""
    params, running = _absent(params), _absent(running)
    kernel = _kernel(
        'patchwise_attention', x, batch_stats, _released(relation, len(eps)), _compiled_patchwise(relation))
    if kernel in _SAVED_BY and batch_stats[0]:
        if kernel == 'cpp':
            out, stats, saved, hidden = attention_cpp.patchwise_forward(x, kernel_size, relation, eps, params)
        else:
            out, stats, saved, hidden = attention_train.patchwise_forward(x, kernel_size, eps[0], eps[1], params)
        return out, stats, _tagged(saved, kernel), hidden
    if kernel == 'cpp':
        out = attention_cpp.patchwise_eval(x, params, running, kernel_size, relation, eps)
        return out, x.new_empty(0), x.new_empty(0), x.new_empty(0)
    if kernel == 'triton':
        x1, x2, x3 = _project(x, params[:_CONVS])
        folded = fold_mapping(_eval_mapping(params, running), eps[0], eps[1])
        return attention_triton.patchwise_eval(x1, x2, x3, folded, kernel_size), x.new_empty(0), x.new_empty(0), \
            x.new_empty(0)
    if kernel == 'cpu':
        x1, x2, x3 = _eval_projection(x, params)
        out = attention_eval.patchwise_attention(
            x1, x2, x3, _eval_mapping(params, running), eps[0], eps[1], kernel_size)
        return out, x.new_empty(0), x.new_empty(0), x.new_empty(0)
    out, stats = _patchwise_reference(_OPERATORS, x, params, running, kernel_size, relation, eps, batch_stats)
    return out, stats, x.new_empty(0), x.new_empty(0)


@_patchwise_attention.register_fake
def _(x, params, running, kernel_size, relation, eps, batch_stats):
    out = x.new_empty((x.shape[0], params[4].shape[0], x.shape[2], x.shape[3]))
    size = _stats_size(params, batch_stats)
    kernel = _kernel(
        'patchwise_attention', x, batch_stats, _released(relation, len(eps)), _compiled_patchwise(relation))
    training_kernel = batch_stats[0] and kernel in _SAVED_BY
    # the hidden layers' inputs (all but the relation), map-sized, as the training kernels keep them
    hidden_planes = sum(_layer_inputs(params)[1:])
    hidden_shape = (x.shape[0], hidden_planes, x.shape[2] * x.shape[3]) if training_kernel else (0,)
    saved = x.new_empty(size + 1 if training_kernel else 0,
                        dtype=torch.float64 if kernel == 'cpp' and training_kernel else x.dtype)
    return out, x.new_empty(size), saved, x.new_empty(hidden_shape)


@custom_op('timm_san::patchwise_attention_backward', mutates_args=())
@outside_autocast
def _patchwise_attention_backward(
        grad_out: torch.Tensor, x: torch.Tensor, params: Tensors, running: Tensors, saved: torch.Tensor,
        hidden: torch.Tensor, kernel_size: int, relation: int, eps: List[float], batch_stats: List[int],
        input_grad: bool,
) -> List[torch.Tensor]:
    """``[grad_x, *grad_params]``, empty where there is no gradient (a missing bias)."""
    params, running = _absent(params), _absent(running)
    if saved.numel():
        kernel, saved = _untagged(saved)
        if kernel == 'cpp':
            grad_x, grad_params = attention_cpp.patchwise_backward(
                grad_out, x, hidden, saved, params, kernel_size, relation, eps, input_grad)
        else:
            grad_x, grad_params = attention_train.patchwise_backward(
                grad_out, x, hidden, saved, params, kernel_size, eps[0], eps[1], input_grad)
        grads = [grad_x, *grad_params]
    else:
        grads = _patchwise_reference_backward(
            grad_out, x, params, running, kernel_size, relation, eps, batch_stats)
    return owned_grads(x, grads)


@_patchwise_attention_backward.register_fake
def _(grad_out, x, params, running, saved, hidden, kernel_size, relation, eps, batch_stats, input_grad):
    return [torch.empty_like(x)] + [torch.empty_like(p) for p in params]


def _patchwise_setup(ctx, inputs, output) -> None:
    x, params, running = inputs[:3]
    ctx.arguments = inputs[3:]
    ctx.num_params = len(params)
    ctx.save_for_backward(x, output[2], output[3], *params, *_used_running(running, inputs[-1]))


def _patchwise_grad(ctx, grad_out, grad_stats, grad_saved, grad_hidden):
    x, saved, hidden, *rest = ctx.saved_tensors
    params, running = rest[:ctx.num_params], rest[ctx.num_params:]
    grads = _patchwise_attention_backward(
        grad_out, x, params, running, saved, hidden, *ctx.arguments, bool(ctx.needs_input_grad[0]))
    grad_params = [None if p.numel() == 0 else g for p, g in zip(params, grads[1:])]
    return grads[0], grad_params, [None] * len(running), None, None, None, None


_patchwise_attention.register_autograd(_patchwise_grad, setup_context=_patchwise_setup)


# --- the public functions

def attention_params(layers: int) -> Tuple[str, ...]:
    """The parameter names of a SAM whose weight mapping has ``layers`` layers, in the operators' order."""
    mapping = []
    for layer in range(layers):
        mapping += [f'conv_w.{3 * layer}.weight', f'conv_w.{3 * layer}.bias', f'conv_w.{3 * layer + 2}.weight',
                    f'conv_w.{3 * layer + 2}.bias']
    return ATTENTION_PARAMS[:_CONVS] + tuple(mapping)


def _check_arguments(params: OptionalTensors, running: Sequence[Optional[torch.Tensor]], kernel_size: int,
                     relation: int, relations: Sequence[str], eps: Sequence[float], batch_stats: Sequence[bool],
                     ) -> None:
    reference.check_kernel_size(kernel_size)
    if not 0 <= relation < len(relations):
        raise ValueError(f'relation code {relation} names no relation; codes 0-{len(relations) - 1}: {relations}.')
    layers = len(eps)
    if not 1 <= layers <= 3 or len(batch_stats) != layers:
        raise ValueError(f'SAN attention takes one to three mapping layers, with one eps and one batch_stats flag '
                         f'each; got {layers} eps and {len(batch_stats)} flags.')
    if len(params) != _CONVS + 4 * layers or len(running) != 2 * layers:
        names = attention_params(layers)
        raise ValueError(
            f'SAN attention with {layers} mapping layers takes {len(names)} parameters ({", ".join(names)}) and '
            f'{2 * layers} running statistics, got {len(params)} and {len(running)}.')


def _in_dtype(x: torch.Tensor, tensors: Sequence[Optional[torch.Tensor]]) -> OptionalTensors:
    """Under autocast the parameters stay float32 while ``x`` may be float16 / bfloat16: compute in ``x``'s dtype."""
    return [t if t is None or t.dtype == x.dtype else t.to(x.dtype) for t in tensors]


@register_notrace_function
def pairwise_attention(
        x: torch.Tensor,
        params: List[Optional[torch.Tensor]],
        running: List[Optional[torch.Tensor]],
        position: Optional[torch.Tensor],
        kernel_size: int,
        eps: List[float],
        batch_stats: List[bool],
        relation: int = 0,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Pairwise SAM: ``aggregation(conv3(x), softmax(mapping(delta(conv1(x)[c], conv2(x)[nbr]); p[c] - p[nbr])))``.

    Args:
        x: SAM's input ``(B, C_in, H, W)``.
        params: The module's parameters in ``attention_params(len(eps))`` order (None for a missing bias).
        running: ``[running_mean, running_var]`` of each mapping norm (None: not tracked).
        position: The position encoding ``(1, 2, H, W)`` (``conv_p(position_grid(x))``), or None for none.
        kernel_size: Footprint side ``k`` (odd).
        eps: Each mapping norm's epsilon (one per layer).
        batch_stats: Whether each mapping norm normalises with batch statistics (training).
        relation: ``PAIR_RELATIONS.index(name)``; 0, subtraction, as released.

    Returns:
        ``(out, stats)``: the output ``(B, C, H, W)``, and ``[mean, unbiased var]`` of each BatchNorm that took
        batch statistics, concatenated (empty if none did).
    """
    if not torch.jit.is_scripting():
        _check_arguments(params, running, kernel_size, relation, PAIR_RELATIONS, eps, batch_stats)
        if inline_reference():
            return _pairwise_reference(
                _STANDARD, x, params, running, position, kernel_size, relation, eps, batch_stats)
        if autocast_enabled(x):
            params, running = _in_dtype(x, params), _in_dtype(x, running)
            position = None if position is None else position.to(x.dtype)
    out, stats, _ = torch.ops.timm_san.pairwise_attention(
        x, _with_absent(params, x), _with_absent(running, x), x.new_empty(0) if position is None else position,
        kernel_size, relation, eps, [int(flag) for flag in batch_stats])
    return out, stats


@register_notrace_function
def patchwise_attention(
        x: torch.Tensor,
        params: List[Optional[torch.Tensor]],
        running: List[Optional[torch.Tensor]],
        kernel_size: int,
        eps: List[float],
        batch_stats: List[bool],
        relation: int = 0,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Patchwise SAM: ``aggregation(conv3(x), mapping([conv1(x); conv2(x) over the footprint]))``.

    Args:
        x: SAM's input ``(B, C_in, H, W)``.
        params: The module's parameters in ``attention_params(len(eps))`` order (None for a missing bias).
        running: ``[running_mean, running_var]`` of each mapping norm (None: not tracked).
        kernel_size: Footprint side ``k`` (odd).
        eps: Each mapping norm's epsilon (one per layer).
        batch_stats: Whether each mapping norm normalises with batch statistics (training).
        relation: ``PATCH_RELATIONS.index(name)``; 0, concatenation, as released.

    Returns:
        ``(out, stats)`` as ``pairwise_attention`` returns them.
    """
    if not torch.jit.is_scripting():
        _check_arguments(params, running, kernel_size, relation, PATCH_RELATIONS, eps, batch_stats)
        if inline_reference():
            return _patchwise_reference(_STANDARD, x, params, running, kernel_size, relation, eps, batch_stats)
        if autocast_enabled(x):
            params, running = _in_dtype(x, params), _in_dtype(x, running)
    out, stats, _, _ = torch.ops.timm_san.patchwise_attention(
        x, _with_absent(params, x), _with_absent(running, x), kernel_size, relation, eps,
        [int(flag) for flag in batch_stats])
    return out, stats
