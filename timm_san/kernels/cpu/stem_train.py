""" SAN's stem in training on CPU: conv, BatchNorm (batch statistics), ReLU and max-pool, forward and backward

At 224 x 224 the stem's 64-channel maps are the largest of the network, and autograd would keep three of them
for backward. The conv has 3 input channels, so its output's batch mean and variance follow from the input's
mean and 3 x 3 covariance (``W m`` and ``w^T S w``); the normalised map is then a folded 1x1 conv, pooled by the
eval stem's loop (``stem_eval.pooled_linear_relu``), which here also records each window's winning phase (the
first on ties, as ``MaxPool2d`` picks it) as one byte. Backward keeps the input, the pooled output and those bytes:
the weight gradient is a closed form around a 64 x 3 moment matrix, the input gradient flows to the winning
pixels and, through the batch statistics, to every pixel.
"""
from typing import Optional, Tuple

import torch

from ..common import bn_scale_shift, input_moments
from .stem_eval import pooled_linear_relu, window_phases

__all__ = ['stem_forward', 'stem_backward', 'stem_statistics', 'add_statistics_grad']


def stem_forward(
        x: torch.Tensor, conv_weight: torch.Tensor, bn_weight: torch.Tensor, bn_bias: torch.Tensor, eps: float,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``max_pool2d(relu(batch_norm(conv2d(x, conv_weight))), 2, 2)`` with batch statistics.

    Args:
        x: Input images ``(B, C, H, W)``.
        conv_weight: Bias-free 1x1 conv weight ``(O, C, 1, 1)``.
        bn_weight: BatchNorm weight ``(O,)``.
        bn_bias: BatchNorm bias ``(O,)``.
        eps: BatchNorm epsilon.

    Returns:
        ``(out, argmax)``: the pooled map, and the winning phase of each window (uint8) for ``stem_backward``.
    """
    out_planes = conv_weight.shape[0]
    weight, mean, var = stem_statistics(x, conv_weight)
    scale, shift = bn_scale_shift(bn_weight, bn_bias, mean, torch.rsqrt(var + eps))
    argmax = torch.empty((x.shape[0], out_planes, x.shape[2] // 2, x.shape[3] // 2), dtype=torch.uint8, device=x.device)
    out = pooled_linear_relu(x, weight * scale.view(-1, 1), shift, argmax)
    return out, argmax


def stem_statistics(x: torch.Tensor, conv_weight: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(weight as a matrix, mean, biased var)`` of the bias-free conv's output per channel, from the input's mean
    and covariance."""
    weight = conv_weight.reshape(conv_weight.shape[0], -1)
    mean_in, covariance = input_moments(x)
    return weight, weight @ mean_in, ((weight @ covariance) * weight).sum(dim=1)


def stem_backward(
        grad: torch.Tensor, x: torch.Tensor, out: torch.Tensor, argmax: torch.Tensor, conv_weight: torch.Tensor,
        bn_weight: torch.Tensor, eps: float, input_grad: bool = True,
) -> Tuple[Optional[torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of ``stem_forward``: ``(grad_x or None, grad_conv_weight, grad_bn_weight, grad_bn_bias)``."""
    batch, out_planes = out.shape[0], out.shape[1]
    spatial = out.shape[2] * out.shape[3]
    weight = conv_weight.reshape(out_planes, -1)
    mean_in, covariance = input_moments(x)
    invstd = torch.rsqrt(((weight @ covariance) * weight).sum(dim=1) + eps)
    # the ReLU's gradient, on the pooled map (it commutes with the pool)
    grad = torch.where(out > 0, grad, 0).reshape(batch, out_planes, spatial)
    argmax = argmax.view(batch, out_planes, spatial)
    centred = window_phases(x - mean_in.view(1, -1, 1, 1))
    scale = bn_weight * invstd
    folded = weight * scale.view(-1, 1)
    grad_x = x.new_zeros(x.shape) if input_grad else None
    # P = sum over the winning pixels of grad * (x - m): per sample and phase, a matmul over the pooled map; the
    # same phase gradients carry W'^T g to the input's winning pixels
    moment = x.new_zeros((out_planes, x.shape[1]))
    for sample in range(batch):
        for phase in range(4):
            phase_grad = torch.where(argmax[sample] == phase, grad[sample], 0)
            moment.addmm_(phase_grad, centred[sample, phase].t())
            if grad_x is not None:
                _phase_view(grad_x, phase)[sample] += (folded.t() @ phase_grad).view(x.shape[1], *out.shape[2:])
    grad_shift = grad.sum(dim=(0, 2))
    grad_norm = (weight * moment).sum(dim=1)
    grad_conv = scale.view(-1, 1) * (moment - (grad_norm * invstd * invstd).view(-1, 1) * (weight @ covariance))
    if grad_x is not None:
        add_statistics_grad(grad_x, x, mean_in, weight, folded, scale * grad_norm * invstd * invstd, grad_shift)
    return grad_x, grad_conv.view(conv_weight.shape), grad_norm * invstd, grad_shift


def _phase_view(x: torch.Tensor, phase: int) -> torch.Tensor:
    """The pixels of phase ``(dy, dx) = divmod(phase, 2)`` of every 2x2 window: a ``(B, C, H/2, W/2)`` view."""
    pooled_h, pooled_w = x.shape[2] // 2, x.shape[3] // 2
    windows = x[:, :, :2 * pooled_h, :2 * pooled_w].view(x.shape[0], x.shape[1], pooled_h, 2, pooled_w, 2)
    return windows[:, :, :, phase // 2, :, phase % 2]


def add_statistics_grad(
        grad_x: torch.Tensor,
        x: torch.Tensor,
        mean_in: torch.Tensor,
        weight: torch.Tensor,
        folded: torch.Tensor,
        variance_coefficient: torch.Tensor,
        grad_shift: torch.Tensor,
) -> None:
    """Adds to every pixel's input gradient the part that flows through the batch statistics: ``M (x - m) + v``.

    ``v = -W'^T G0 / N`` and ``M = -sum_o c_o w_o w_o^T / N`` with ``c_o = a_o G1_o / (var_o + eps)`` (the
    ``variance_coefficient``): every pixel of the batch (the pool's odd last row or column too) feeds the BatchNorm's
    mean and variance.
    """
    batch, planes = x.shape[0], x.shape[1]
    pixels = batch * x.shape[2] * x.shape[3]
    shift = -(folded.t() @ grad_shift) / pixels
    linear = -(weight.t() * variance_coefficient) @ weight / pixels
    centred = (x - mean_in.view(1, -1, 1, 1)).reshape(batch, planes, -1)
    grad_x.view(batch, planes, -1).baddbmm_(linear.expand(batch, -1, -1), centred).add_(shift.view(1, -1, 1))
