""" 1x1 convolutions on CPU as batched matrix products, forward and backward

On CPU a 1x1 conv of an NCHW batch goes through oneDNN with layout reorders (2+ threads) or an im2col path (1
thread). One batched matmul on the ``(B, C, H * W)`` view reads the map in place instead: on SAN's 112x112 and 56x56
maps that is 1.5 to 3x faster forward, and its backward (two more products) 2 to 2.5x faster than oneDNN's; on 7x7
maps oneDNN is faster, so small maps keep the conv. Results equal ``F.conv2d`` up to float rounding.
"""
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

__all__ = ['conv1x1', 'conv1x1_split', 'conv1x1_concat', 'conv1x1_concat_backward', 'conv1x1_backward',
           'concat_weights', 'split_grads', 'MATMUL_MIN_SPATIAL']

# below this many pixels per map oneDNN's batched 1x1 conv beats per-sample matmuls (SAN's 7x7 last stage)
MATMUL_MIN_SPATIAL = 100
# 1x1 convs of one input are concatenated into one matmul only while the concatenated weights are at most this
# fraction of the input map (reading the map once saves more than copying the weights costs)
_CONCAT_MAX_WEIGHT_FRACTION = 1 / 8


def _use_matmul(x: torch.Tensor) -> bool:
    return x.shape[-2] * x.shape[-1] >= MATMUL_MIN_SPATIAL


def conv1x1(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``conv2d(x, weight, bias)`` for a 1x1 kernel, as one batched matmul on large maps.

    Args:
        x: Tensor of shape ``(B, C, H, W)``.
        weight: Conv weight ``(O, C, 1, 1)``.
        bias: Conv bias ``(O,)`` or None.

    Returns:
        Tensor of shape ``(B, O, H, W)``.
    """
    if not _use_matmul(x):
        return F.conv2d(x, weight, bias)
    batch, planes, height, width = x.shape
    out_planes = weight.shape[0]
    # the map itself is returned (not a view of the product), so that callers may add to it in place
    out = x.new_empty((batch, out_planes, height, width))
    # a broadcast (stride 0) weight: bmm reads each sample in place (matmul would fold the batch into a copy)
    torch.bmm(weight.reshape(out_planes, planes).expand(batch, -1, -1), x.reshape(batch, planes, height * width),
              out=out.view(batch, out_planes, height * width))
    if bias is not None:
        out.view(batch, out_planes, -1).add_(bias.view(1, -1, 1))
    return out


def conv1x1_backward(
        grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, input_grad: bool = True,
) -> Tuple[Optional[torch.Tensor], torch.Tensor, torch.Tensor]:
    """Gradients of ``conv2d(x, weight, bias)`` for a 1x1 kernel: input (if ``input_grad``), weight and bias.

    Args:
        grad: Gradient of the output ``(B, O, H, W)``.
        x: The conv's input ``(B, C, H, W)``.
        weight: Conv weight ``(O, C, 1, 1)``.
        input_grad: Whether to compute the input's gradient.

    Returns:
        ``(grad_x or None, grad_weight (O, C, 1, 1), grad_bias (O,))``.
    """
    grad = grad.contiguous()
    if not _use_matmul(x):
        return tuple(torch.ops.aten.convolution_backward(
            grad, x, weight, None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1, [input_grad, True, True]))
    batch, planes, height, width = x.shape
    out_planes = weight.shape[0]
    grad = grad.reshape(batch, out_planes, height * width)
    x = x.reshape(batch, planes, height * width)
    grad_x = None
    if input_grad:
        matrix_t = weight.reshape(out_planes, planes).t().expand(batch, -1, -1)
        grad_x = torch.bmm(matrix_t, grad).view(batch, planes, height, width)
    # one product per sample, accumulated: a batched product would hold a (B, O, C) gradient per sample
    grad_weight = grad.new_zeros((out_planes, planes))
    for index in range(batch):
        grad_weight.addmm_(grad[index], x[index].t())
    return grad_x, grad_weight.view_as(weight), grad.sum((0, 2))


def conv1x1_split(
        x: torch.Tensor, weights: Sequence[torch.Tensor], biases: Sequence[Optional[torch.Tensor]],
) -> List[torch.Tensor]:
    """Several 1x1 convs of one input, as one matmul with the concatenated weights where that pays.

    Args:
        x: Tensor of shape ``(B, C, H, W)``.
        weights: Conv weights ``(O_i, C, 1, 1)``.
        biases: Conv biases ``(O_i,)``, each or None.

    Returns:
        ``conv2d(x, weights[i], biases[i])`` for each i; with one matmul these are channel slices of its output.
    """
    sizes = [w.shape[0] for w in weights]
    batch, spatial = x.shape[0], x.shape[-2] * x.shape[-1]
    if len(weights) < 2 or not _use_matmul(x) or sum(sizes) > _CONCAT_MAX_WEIGHT_FRACTION * batch * spatial:
        return [conv1x1(x, w, b) for w, b in zip(weights, biases)]
    return conv1x1_concat(x, weights, biases)


def concat_weights(weights: Sequence[torch.Tensor], biases: Sequence[Optional[torch.Tensor]],
                   ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Several 1x1 convs of one input as one: the weights stacked, the biases too (zeros where one has none)."""
    bias = None
    if any(b is not None for b in biases):
        bias = torch.cat([w.new_zeros(w.shape[0]) if b is None else b for w, b in zip(weights, biases)])
    return torch.cat(list(weights)), bias


def conv1x1_concat(
        x: torch.Tensor, weights: Sequence[torch.Tensor], biases: Sequence[Optional[torch.Tensor]],
) -> List[torch.Tensor]:
    """Several 1x1 convs of one input as one conv (one pass over ``x``), split into channel slices (views).

    Args:
        x: Tensor of shape ``(B, C, H, W)``.
        weights: Conv weights ``(O_i, C, 1, 1)``.
        biases: Conv biases ``(O_i,)``, each or None.
    """
    weight, bias = concat_weights(weights, biases)
    return list(conv1x1(x, weight, bias).split([w.shape[0] for w in weights], dim=1))


def conv1x1_concat_backward(
        grads: Sequence[torch.Tensor], x: torch.Tensor, weights: Sequence[torch.Tensor],
        biases: Sequence[Optional[torch.Tensor]], input_grad: bool,
) -> Tuple[Optional[torch.Tensor], List[Optional[torch.Tensor]]]:
    """Backward of ``conv1x1_concat``: the input's gradient (if ``input_grad``) and ``[weight_0, bias_0, ...]``'s
    gradients (None for an absent bias)."""
    weight, _ = concat_weights(weights, biases)
    grad_x, grad_weight, grad_bias = conv1x1_backward(torch.cat(list(grads), dim=1), x, weight, input_grad)
    return grad_x, split_grads(grad_weight, grad_bias, weights, biases)


def split_grads(grad_weight: torch.Tensor, grad_bias: torch.Tensor, weights: Sequence[torch.Tensor],
                biases: Sequence[Optional[torch.Tensor]]) -> List[Optional[torch.Tensor]]:
    """The stacked conv's weight and bias gradients as ``[weight_0, bias_0, ...]``'s (None for an absent bias)."""
    grad_params: List[Optional[torch.Tensor]] = []
    start = 0
    for w, b in zip(weights, biases):
        end = start + w.shape[0]
        grad_params += [grad_weight[start:end], grad_bias[start:end] if b is not None else None]
        start = end
    return grad_params
