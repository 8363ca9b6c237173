""" Self-attention module (SAM) of SAN, pairwise and patchwise

"Exploring Self-attention for Image Recognition", Zhao, Jia, Koltun, CVPR 2020 (https://arxiv.org/abs/2004.13621)

Submodule names (``conv1``, ``conv2``, ``conv3``, ``conv_w.N``, ``conv_p``) are those of the official release,
so its checkpoints load as they are. The attention arithmetic lives in ``timm_san.ops``.
"""
from typing import Type

import torch
import torch.nn as nn

from .ops import aggregation, footprint, position_grid, subtraction, subtraction2

__all__ = ['SelfAttention', 'SA_TYPES']

SA_TYPES = ('pairwise', 'patchwise')


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
            act_layer: Type[nn.Module] = nn.ReLU,
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
            norm_layer: Normalization layer of the weight mapping.
            act_layer: Activation layer of the weight mapping.
            device: Device of the parameters.
            dtype: Dtype of the parameters.
        """
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        if sa_type not in SA_TYPES:
            raise ValueError(f'sa_type must be one of {SA_TYPES}, got {sa_type!r}.')
        if kernel_size < 1 or kernel_size % 2 != 1:
            raise ValueError(f'kernel_size must be a positive odd number, got {kernel_size}.')
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
                act_layer(inplace=True),
                nn.Conv2d(rel_planes + 2, rel_planes, kernel_size=1, bias=False, **dd),
                norm_layer(rel_planes, **dd),
                act_layer(inplace=True),
                nn.Conv2d(rel_planes, weight_planes, kernel_size=1, **dd),
            )
            self.conv_p = nn.Conv2d(2, 2, kernel_size=1, **dd)
        else:
            relation_planes = rel_planes * (num_offsets + 1)
            self.conv_w = nn.Sequential(
                norm_layer(relation_planes, **dd),
                act_layer(inplace=True),
                nn.Conv2d(relation_planes, weight_planes, kernel_size=1, bias=False, **dd),
                norm_layer(weight_planes, **dd),
                act_layer(inplace=True),
                nn.Conv2d(weight_planes, num_offsets * weight_planes, kernel_size=1, **dd),
            )
            self.conv_p = None

    def attention_weights(self, x: torch.Tensor) -> torch.Tensor:
        """Attention weights of shape ``(B, out_planes // share_planes, k * k, H * W)``."""
        batch, _, height, width = x.shape
        x1, x2 = self.conv1(x), self.conv2(x)
        if self.conv_p is not None:
            pos = subtraction(self.conv_p(position_grid(x)), self.kernel_size)
            relation = torch.cat([subtraction2(x1, x2, self.kernel_size), pos.expand(batch, -1, -1, -1)], dim=1)
            return torch.softmax(self.conv_w(relation), dim=2)
        # patchwise: channel-major (c * k * k + offset) footprint after the centre, as the official unfold
        relation = torch.cat([
            x1.reshape(batch, -1, 1, height * width),
            footprint(x2, self.kernel_size).reshape(batch, -1, 1, height * width),
        ], dim=1)
        weight = self.conv_w(relation)
        return weight.reshape(batch, -1, self.kernel_size * self.kernel_size, height * width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return aggregation(self.conv3(x), self.attention_weights(x), self.kernel_size)
