""" Self-attention module (SAM) of SAN, pairwise and patchwise

"Exploring Self-attention for Image Recognition", Zhao, Jia, Koltun, CVPR 2020 (https://arxiv.org/abs/2004.13621)

Submodule names (``conv1``, ``conv2``, ``conv3``, ``conv_w.N``, ``conv_p``) are those of the official release,
so its checkpoints load as they are. The module holds the parameters; its arithmetic is one call of
``timm_san.ops.pairwise_attention`` / ``patchwise_attention``, which pick the kernel that computes it.
"""
from typing import List, Optional, Type

import torch
import torch.nn as nn
from timm.layers import register_notrace_function

from .kernels.reference import check_kernel_size
from .ops import pairwise_attention, patchwise_attention, position_grid

__all__ = ['SelfAttention', 'SA_TYPES']

SA_TYPES = ('pairwise', 'patchwise')


@register_notrace_function  # FX records the call: tracing must not write into the real buffers
def fold_batch_stats(
        running_mean: Optional[torch.Tensor],
        running_var: Optional[torch.Tensor],
        num_batches_tracked: Optional[torch.Tensor],
        momentum: Optional[float],
        mean: torch.Tensor,
        var: torch.Tensor,
        samples: int,
) -> None:
    """What a BatchNorm's training forward does to its running statistics, given the batch's mean and unbiased
    variance over ``samples`` samples (nothing where it tracks none; an empty batch is only counted; momentum
    None: the cumulative average)."""
    if running_mean is None or running_var is None:
        return
    if num_batches_tracked is not None:
        num_batches_tracked.add_(1)
    if samples == 0:
        return
    mean, var = mean.detach().to(running_mean.dtype), var.detach().to(running_var.dtype)
    if momentum is None:
        assert num_batches_tracked is not None
        factor = 1.0 / num_batches_tracked
        running_mean.mul_(1 - factor).add_(mean * factor)
        running_var.mul_(1 - factor).add_(var * factor)
    else:
        running_mean.mul_(1 - momentum).add_(mean, alpha=momentum)
        running_var.mul_(1 - momentum).add_(var, alpha=momentum)


class SelfAttention(nn.Module):
    """SAM: local self-attention over a ``k x k`` footprint, weights shared by ``share_planes`` channels.

    Pairwise: the weight of each neighbour is a mapping of the subtraction relation
    ``conv1(x)[centre] - conv2(x)[neighbour]`` (with the same difference of a learned position encoding),
    normalised by a softmax over the footprint.
    Patchwise: the weights of the whole footprint are a mapping of ``conv1(x)`` at the centre concatenated with
    ``conv2(x)`` over the footprint, not normalised.
    Either way the output is the weighted sum of ``conv3(x)`` over the footprint.
    """

    def __init__(
            self,
            sa_type: str,
            in_planes: int,
            rel_planes: int,
            out_planes: int,
            share_planes: int = 8,
            kernel_size: int = 7,
            norm_layer: Type[nn.Module] = nn.BatchNorm2d,
            device=None,
            dtype=None,
    ):
        """
        Args:
            sa_type: 'pairwise' or 'patchwise'.
            in_planes: Input channels.
            rel_planes: Channels of the relation (conv1, conv2).
            out_planes: Output channels (conv3); must be divisible by ``share_planes``.
            share_planes: How many output channels share one attention weight channel.
            kernel_size: Footprint side (odd).
            norm_layer: BatchNorm layer of the weight mapping (its activation is the official ReLU).
            device: Device of the parameters.
            dtype: Dtype of the parameters.
        """
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        if sa_type not in SA_TYPES:
            raise ValueError(f'sa_type must be one of {SA_TYPES}, got {sa_type!r}.')
        check_kernel_size(kernel_size)
        if out_planes % share_planes != 0:
            raise ValueError(f'out_planes ({out_planes}) must be divisible by share_planes ({share_planes}).')
        self.sa_type = sa_type
        self.kernel_size = kernel_size
        weight_planes = out_planes // share_planes
        num_offsets = kernel_size * kernel_size

        self.conv1 = nn.Conv2d(in_planes, rel_planes, kernel_size=1, **dd)
        self.conv2 = nn.Conv2d(in_planes, rel_planes, kernel_size=1, **dd)
        self.conv3 = nn.Conv2d(in_planes, out_planes, kernel_size=1, **dd)
        if sa_type == 'pairwise':
            self.conv_w = nn.Sequential(
                norm_layer(rel_planes + 2, **dd),
                nn.ReLU(inplace=True),
                nn.Conv2d(rel_planes + 2, rel_planes, kernel_size=1, bias=False, **dd),
                norm_layer(rel_planes, **dd),
                nn.ReLU(inplace=True),
                nn.Conv2d(rel_planes, weight_planes, kernel_size=1, **dd),
            )
            self.conv_p = nn.Conv2d(2, 2, kernel_size=1, **dd)
        else:
            relation_planes = rel_planes * (num_offsets + 1)
            self.conv_w = nn.Sequential(
                norm_layer(relation_planes, **dd),
                nn.ReLU(inplace=True),
                nn.Conv2d(relation_planes, weight_planes, kernel_size=1, bias=False, **dd),
                norm_layer(weight_planes, **dd),
                nn.ReLU(inplace=True),
                nn.Conv2d(weight_planes, num_offsets * weight_planes, kernel_size=1, **dd),
            )
            self.conv_p = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # one by one: TorchScript loses a module's constants (eps) through tuple assignment
        bn1 = self.conv_w[0]
        map1 = self.conv_w[2]
        bn2 = self.conv_w[3]
        map2 = self.conv_w[5]
        params: List[Optional[torch.Tensor]] = [
            self.conv1.weight, self.conv1.bias, self.conv2.weight, self.conv2.bias, self.conv3.weight,
            self.conv3.bias, bn1.weight, bn1.bias, map1.weight, map1.bias, bn2.weight, bn2.bias, map2.weight,
            map2.bias]
        running = (bn1.running_mean, bn1.running_var, bn2.running_mean, bn2.running_var)
        # as nn.BatchNorm2d decides it; a norm without momentum (timm's FrozenBatchNorm2d) keeps its statistics
        batch_stats1 = (bn1.training and hasattr(bn1, 'momentum')) or bn1.running_mean is None
        batch_stats2 = (bn2.training and hasattr(bn2, 'momentum')) or bn2.running_mean is None
        if self.conv_p is not None:
            position = self.conv_p(position_grid(x))
            out, stats = pairwise_attention(
                x, params, running, position, self.kernel_size, bn1.eps, bn2.eps, batch_stats1, batch_stats2)
        else:
            out, stats = patchwise_attention(
                x, params, running, self.kernel_size, bn1.eps, bn2.eps, batch_stats1, batch_stats2)
        # the statistics of the norms on batch statistics, [mean1, var1] and [mean2, var2], as their own forward
        # would fold them into their running statistics
        if batch_stats1:
            planes = map1.weight.shape[1]
            fold_batch_stats(
                bn1.running_mean, bn1.running_var, bn1.num_batches_tracked, bn1.momentum, stats[:planes],
                stats[planes:2 * planes], x.shape[0])
            stats = stats[2 * planes:]
        if batch_stats2:
            planes = map1.weight.shape[0]
            fold_batch_stats(
                bn2.running_mean, bn2.running_var, bn2.num_batches_tracked, bn2.momentum, stats[:planes],
                stats[planes:2 * planes], x.shape[0])
        return out
