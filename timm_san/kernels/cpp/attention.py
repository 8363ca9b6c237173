""" SAN's attention through the compiled CPU kernels: SAM's three 1x1 convs as one matmul, the rest in C++

The C++ operators (``torch.ops.timm_san_cpp``, ``csrc/``) take the three maps after the convs and the mapping's
tensors and run one parallel loop per pass over bands of rows. Here: the convs, their backward, and the argument
lists. The parameter list is ``timm_san.ops.attention``'s: the three convs, then per mapping layer its norm's and
conv's weight and bias, None where absent; a relation is the kernels' code (``PAIR_RELATIONS`` /
``PATCH_RELATIONS`` there); ``eps`` has one entry per mapping layer. Without a position encoding, ``position`` is
empty.
"""
from typing import List, Optional, Sequence, Tuple

import torch

from ..common import check_batch_size
from ..cpu.conv1x1 import concat_weights, split_grads
from .pointwise import conv1x1, conv1x1_backward

__all__ = ['pairwise_eval', 'pairwise_forward', 'pairwise_backward', 'patchwise_eval', 'patchwise_forward',
           'patchwise_backward']

OptionalTensors = Sequence[Optional[torch.Tensor]]


def _with_planes(t: torch.Tensor) -> torch.Tensor:
    """``t`` with contiguous planes, as the kernels read maps (a channel slice of an NCHW map has them)."""
    height, width = t.shape[-2], t.shape[-1]
    return t if t.stride()[1:] == (height * width, width, 1) else t.contiguous()


def _projections(x: torch.Tensor, params: OptionalTensors) -> List[torch.Tensor]:
    """conv1, conv2, conv3 of SAM as one 1x1 conv (channel slices of one output)."""
    weight, bias = concat_weights(params[0:6:2], params[1:6:2])
    out = conv1x1(x, weight, bias)
    return [_with_planes(t) for t in out.split([w.shape[0] for w in params[0:6:2]], dim=1)]


def _projections_backward(grads: Sequence[torch.Tensor], x: torch.Tensor, params: OptionalTensors,
                          input_grad: bool) -> Tuple[Optional[torch.Tensor], List[Optional[torch.Tensor]]]:
    """Backward of ``_projections``: the input's gradient and ``[conv1.weight, conv1.bias, ...]``'s."""
    weight, _ = concat_weights(params[0:6:2], params[1:6:2])
    grad_x, grad_weight, grad_bias = conv1x1_backward(torch.cat(list(grads), dim=1), x, weight, input_grad)
    return grad_x, split_grads(grad_weight, grad_bias, params[0:6:2], params[1:6:2])


def _present(t: Optional[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    return like.new_empty(0) if t is None else t


def _layers(params: OptionalTensors, like: torch.Tensor) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
    """The mapping's conv weights and biases (empty where absent)."""
    return list(params[8::4]), [_present(bias, like) for bias in params[9::4]]


def _norms(params: OptionalTensors, running: Optional[OptionalTensors], like: torch.Tensor) -> List[torch.Tensor]:
    """Per norm: weight, bias, and in eval its running mean and variance."""
    norms = []
    for index, (weight, bias) in enumerate(zip(params[6::4], params[7::4])):
        norms += [_present(weight, like), _present(bias, like)]
        if running is not None:
            norms += [running[2 * index], running[2 * index + 1]]
    return norms


def _unbiased_stats(saved: torch.Tensor, params: OptionalTensors, count: int, like: torch.Tensor) -> torch.Tensor:
    """``[mean, var]`` of each norm for the running statistics (unbiased variances), from the kernels' saved
    ``[mean, biased var]`` per norm."""
    unbias = count / max(count - 1, 1)
    parts, start = [], 0
    for weight in params[8::4]:
        planes = weight.shape[1]
        mean, var = saved[start:start + planes], saved[start + planes:start + 2 * planes]
        parts += [mean, var * unbias]
        start += 2 * planes
    return torch.cat(parts).to(like.dtype)


def _mapping_grads(grads: Sequence[torch.Tensor], params: OptionalTensors) -> List[Optional[torch.Tensor]]:
    """The C++ kernels' per-layer [norm weight, norm bias, conv weight, conv bias] as the params' gradients."""
    return [g if p is not None else None for g, p in zip(grads, params[6:])]


def pairwise_eval(x: torch.Tensor, params: OptionalTensors, running: OptionalTensors, position: torch.Tensor,
                  kernel_size: int, relation: int, eps: List[float]) -> torch.Tensor:
    """Eval pairwise SAM (running statistics) from its input."""
    x1, x2, x3 = _projections(x, params)
    weights, biases = _layers(params, x)
    return torch.ops.timm_san_cpp.pairwise_eval(
        x1, x2, x3, position.contiguous(), _norms(params, running, x), eps, weights, biases, kernel_size, relation)


def pairwise_forward(x: torch.Tensor, position: torch.Tensor, kernel_size: int, relation: int, eps: List[float],
                     params: OptionalTensors) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Training pairwise SAM: ``(out, [mean, var] (unbiased) per norm, saved)``; ``saved`` (float64, the batch mean
    and biased variance of each norm) is what ``pairwise_backward`` takes."""
    check_batch_size(x, kernel_size * kernel_size)
    x1, x2, x3 = _projections(x, params)
    weights, biases = _layers(params, x)
    out, saved = torch.ops.timm_san_cpp.pairwise_train(
        x1, x2, x3, position.contiguous(), _norms(params, None, x), eps, weights, biases, kernel_size, relation)
    count = x.shape[0] * x.shape[2] * x.shape[3] * kernel_size * kernel_size
    return out, _unbiased_stats(saved, params, count, x), saved


def pairwise_backward(grad_out: torch.Tensor, x: torch.Tensor, position: torch.Tensor, saved: torch.Tensor,
                      params: OptionalTensors, kernel_size: int, relation: int, eps: List[float],
                      input_grad: bool = True,
                      ) -> Tuple[Optional[torch.Tensor], torch.Tensor, List[Optional[torch.Tensor]]]:
    """Gradients of ``pairwise_forward``: ``(grad_x or None, grad_position (empty without one), grads of params
    (None: absent))``."""
    x1, x2, x3 = _projections(x, params)
    weights, biases = _layers(params, x)
    grads = torch.ops.timm_san_cpp.pairwise_backward(
        grad_out.contiguous(), x1, x2, x3, position.contiguous(), _norms(params, None, x), eps, saved, weights,
        biases, kernel_size, relation)
    grad_x, grad_convs = _projections_backward(grads[:3], x, params, input_grad)
    return grad_x, grads[3], grad_convs + _mapping_grads(grads[4:], params)


def patchwise_eval(x: torch.Tensor, params: OptionalTensors, running: OptionalTensors, kernel_size: int,
                   relation: int, eps: List[float]) -> torch.Tensor:
    """Eval patchwise SAM (running statistics) from its input."""
    x1, x2, x3 = _projections(x, params)
    weights, biases = _layers(params, x)
    return torch.ops.timm_san_cpp.patchwise_eval(
        x1, x2, x3, _norms(params, running, x), eps, weights, biases, kernel_size, relation)


def patchwise_forward(x: torch.Tensor, kernel_size: int, relation: int, eps: List[float], params: OptionalTensors,
                      ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Training patchwise SAM: ``(out, stats, saved, hidden)`` as ``pairwise_forward``, and the mapping's per-pixel
    hidden layers (one flat buffer, shaped ``(B, planes, H * W)`` for the fake kernel), which
    ``patchwise_backward`` takes too."""
    check_batch_size(x, 1)
    x1, x2, x3 = _projections(x, params)
    weights, biases = _layers(params, x)
    out, saved, hidden = torch.ops.timm_san_cpp.patchwise_train(
        x1, x2, x3, _norms(params, None, x), eps, weights, biases, kernel_size, relation)
    count = x.shape[0] * x.shape[2] * x.shape[3]
    hidden = hidden.view(x.shape[0], sum(w.shape[0] for w in weights[:-1]), x.shape[2] * x.shape[3])
    return out, _unbiased_stats(saved, params, count, x), saved, hidden


def patchwise_backward(grad_out: torch.Tensor, x: torch.Tensor, hidden: torch.Tensor, saved: torch.Tensor,
                       params: OptionalTensors, kernel_size: int, relation: int, eps: List[float],
                       input_grad: bool = True) -> Tuple[Optional[torch.Tensor], List[Optional[torch.Tensor]]]:
    """Gradients of ``patchwise_forward``: ``(grad_x or None, grads of params (None: absent))``."""
    x1, x2, x3 = _projections(x, params)
    weights, biases = _layers(params, x)
    grads = torch.ops.timm_san_cpp.patchwise_backward(
        grad_out.contiguous(), x1, x2, x3, _norms(params, None, x), eps, saved, hidden, weights, biases,
        kernel_size, relation)
    grad_x, grad_convs = _projections_backward(grads[:3], x, params, input_grad)
    return grad_x, grad_convs + _mapping_grads(grads[3:], params)
