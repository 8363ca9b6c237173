""" Training-mode stem of SAN: 1x1 conv, BatchNorm with batch statistics, ReLU and the first 2x2 max-pool

SAN's stem runs at full input resolution: 64 channels at 224 x 224, 205 MB per batch of 16 in float32 for each
of the conv output, the BatchNorm output and the gradients of both, while the pooled map the network goes on with is
a quarter of that. Through the modules, autograd keeps the conv output (for the BatchNorm), the ReLU output and
int64 indices (for the max-pool) until backward.

The conv has only ``C = 3`` input channels, so everything its BatchNorm needs is a statistic of the input:

* with ``y = W x``, the batch mean is ``W m`` and the batch variance ``w_o^T S w_o`` for the input's per-channel
  mean ``m`` and ``C x C`` covariance ``S``; the normalised map is then the 1x1 conv ``W' x + b'`` with
  ``W' = diag(a) W``, ``a = gamma / sqrt(var + eps)``;
* the ReLU commutes with the max-pool, so the forward is the eval stem's pooled matmul loop with ``W'`` and ``b'``
  (``timm_san.eval_stem``), which also records which of the four phases won each window (one byte each);
* in backward only the winning phase of each window gets a gradient, and the weight gradient reduces to the
  ``O x C`` matrix ``P = sum(g * (x - m))`` over those pixels: ``dW = diag(a) (P - diag(G1 / (var + eps)) W S)``
  with ``G1 = rowsum(W * P)``. The input's gradient, where it is needed, is ``W'^T g`` on the winning pixels plus
  an affine map of ``x - m`` everywhere.

Only the input, the pooled output (the next layer's input) and the phase bytes are kept for backward. The results
equal the module path up to float rounding, the BatchNorm's running statistics included.
"""
from typing import Optional, Tuple

import torch
import torch.nn as nn
from torch.autograd.function import once_differentiable

from .eval_stem import pooled_linear_relu, window_phases
from .fusable import plain_conv1x1, plain_max_pool2x2, plain_relu, train_batch_norm
from .ops_train import _bn_coefficients, _update_running_stats, train_input_supported

__all__ = ['pooled_stem_train', 'stem_train_supported']


def _input_moments(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean ``(C,)`` and biased covariance ``(C, C)`` of ``x`` over batch and pixels.

    Reductions rather than a matmul over the pixels: their pairwise summation keeps float32 sums of millions of
    pixels accurate, as BatchNorm's own statistics are.
    """
    mean = x.mean(dim=(0, 2, 3))
    centred = x - mean.view(1, -1, 1, 1)
    covariance = (centred.unsqueeze(1) * centred.unsqueeze(2)).mean(dim=(0, 3, 4))
    return mean, covariance


class _PooledStemTrainFn(torch.autograd.Function):
    """``max_pool2d(relu(batch_norm(conv2d(x, weight))), 2, 2)`` with batch statistics; also returns them."""

    @staticmethod
    def forward(
            ctx,
            x: torch.Tensor,
            eps: float,
            conv_weight: torch.Tensor,
            bn_weight: torch.Tensor,
            bn_bias: torch.Tensor,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        out_planes = conv_weight.shape[0]
        weight = conv_weight.reshape(out_planes, -1)
        mean_in, covariance = _input_moments(x)
        mean = weight @ mean_in
        var = ((weight @ covariance) * weight).sum(dim=1)
        invstd = torch.rsqrt(var + eps)
        scale, shift = _bn_coefficients(bn_weight, bn_bias, mean, invstd)
        argmax = torch.empty(
            (x.shape[0], out_planes, x.shape[2] // 2, x.shape[3] // 2), dtype=torch.uint8, device=x.device)
        out = pooled_linear_relu(x, weight * scale.view(-1, 1), shift, argmax)
        ctx.weight_shape = conv_weight.shape
        ctx.save_for_backward(x, out, argmax, weight, covariance, mean_in, invstd, bn_weight)
        ctx.mark_non_differentiable(argmax)
        stats = torch.cat([mean, var])
        ctx.mark_non_differentiable(stats)
        return out, stats

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor, _grad_stats: Optional[torch.Tensor]):
        x, out, argmax, weight, covariance, mean_in, invstd, bn_weight = ctx.saved_tensors
        batch, out_planes = out.shape[0], out.shape[1]
        spatial = out.shape[2] * out.shape[3]
        # the ReLU's gradient, on the pooled map (it commutes with the pool)
        grad = torch.where(out > 0, grad, 0).reshape(batch, out_planes, spatial)
        argmax = argmax.view(batch, out_planes, spatial)
        centred = window_phases(x - mean_in.view(1, -1, 1, 1))
        scale = bn_weight * invstd
        folded = weight * scale.view(-1, 1)
        grad_x = x.new_zeros(x.shape) if ctx.needs_input_grad[0] else None
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
            _add_statistics_grad(grad_x, x, mean_in, weight, folded, scale * grad_norm * invstd * invstd, grad_shift)
        grad_bn_weight = grad_norm * invstd if ctx.needs_input_grad[3] else None
        grad_bn_bias = grad_shift if ctx.needs_input_grad[4] else None
        return grad_x, None, grad_conv.view(ctx.weight_shape), grad_bn_weight, grad_bn_bias


def _phase_view(x: torch.Tensor, phase: int) -> torch.Tensor:
    """The pixels of phase ``(dy, dx) = divmod(phase, 2)`` of every 2x2 window: a ``(B, C, H/2, W/2)`` view."""
    pooled_h, pooled_w = x.shape[2] // 2, x.shape[3] // 2
    windows = x[:, :, :2 * pooled_h, :2 * pooled_w].view(x.shape[0], x.shape[1], pooled_h, 2, pooled_w, 2)
    return windows[:, :, :, phase // 2, :, phase % 2]


def _add_statistics_grad(
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


def stem_train_supported(
        x: torch.Tensor, conv: nn.Module, bn: nn.Module, act: nn.Module, pool: nn.Module) -> bool:
    """Whether ``pooled_stem_train`` computes these modules' training forward on ``x``.

    CPU float32 / float64 outside autocast; a bias-free 1x1 conv, an affine ``nn.BatchNorm2d`` in training mode with
    running statistics, an ``nn.ReLU`` and a 2x2 max-pool, none of them hooked.
    """
    return (
        train_input_supported(x)
        and plain_conv1x1(conv) and conv.bias is None
        and train_batch_norm(bn)
        and plain_relu(act) and plain_max_pool2x2(pool)
    )


def pooled_stem_train(x: torch.Tensor, conv: nn.Conv2d, bn: nn.BatchNorm2d) -> torch.Tensor:
    """``max_pool2d(relu(bn(conv(x))), 2, 2)`` in training mode, updating ``bn``'s running statistics as it would.

    Args:
        x: Input images ``(B, C, H, W)``.
        conv: The stem's bias-free 1x1 conv.
        bn: Its BatchNorm, in training mode (see ``stem_train_supported``).

    Returns:
        Tensor of shape ``(B, O, H // 2, W // 2)``.
    """
    out, stats = _PooledStemTrainFn.apply(x, bn.eps, conv.weight, bn.weight, bn.bias)
    mean, var = stats.split(bn.num_features)
    pixels = x.shape[0] * x.shape[2] * x.shape[3]
    with torch.no_grad():
        _update_running_stats(bn, mean, var * (pixels / max(pixels - 1, 1)))
    return out
