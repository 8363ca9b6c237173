""" Self-attention module (SAM) of SAN, pairwise and patchwise

"Exploring Self-attention for Image Recognition", Zhao, Jia, Koltun, CVPR 2020 (https://arxiv.org/abs/2004.13621)

Submodule names (``conv1``, ``conv2``, ``conv3``, ``conv_w.N``, ``conv_p``) are those of the official release,
so its checkpoints load as they are. The attention arithmetic lives in ``timm_san.ops`` and ``timm_san.ops_fused``.

Three ways through the same arithmetic, chosen per call:
    * eval (``not self.training``), BatchNorm + ReLU mapping: the fused operators of ``timm_san.ops_fused``
      (BatchNorms folded into fixed affine maps, relation built a few footprint rows at a time);
    * training with autograd: the attention (weights and aggregation) is recomputed in backward instead of
      keeping its ``k * k``-fold intermediates; BatchNorm running statistics are updated once per forward
      (on CPU: the operators of ``timm_san.ops_train``, convs and attention in one autograd Function);
    * otherwise (TorchScript; training under FX tracing, torch.compile or without autograd): the plain operators.
A module built under ``timm.set_scriptable(True)`` takes the plain operators always, so that a graph FX traces
from it still scripts (timm's convention, as ``use_fused_attn()`` for its attention layers).
"""
from typing import Optional, Tuple, Type

import torch
import torch.nn as nn
import torch.utils.checkpoint
from timm.layers import is_scriptable

from .matmul_conv import conv1x1_split
from .fusable import fusions_apply, plain_conv1x1
from .ops import aggregation, check_kernel_size, footprint, position_grid, subtraction, subtraction2
from .ops_fused import pairwise_attention, patchwise_attention
from .ops_train import pairwise_attention_train, patchwise_attention_train, train_supported

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
        check_kernel_size(kernel_size)
        if out_planes % share_planes != 0:
            raise ValueError(f'out_planes ({out_planes}) must be divisible by share_planes ({share_planes}).')
        self.sa_type = sa_type
        self.kernel_size = kernel_size
        # training: recompute the attention in backward rather than keep its k * k-fold intermediates
        self.recompute = True
        # eval: the fused operators, unless the model is meant to be scripted (they are Python-only)
        self.fused = not is_scriptable()
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
        return self._weights(self.conv1(x), self.conv2(x))

    def _weights(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        batch, _, height, width = x1.shape
        if self.conv_p is not None:
            pos = subtraction(self.conv_p(position_grid(x1)), self.kernel_size)
            relation = torch.cat([subtraction2(x1, x2, self.kernel_size), pos.expand(batch, -1, -1, -1)], dim=1)
            return torch.softmax(self.conv_w(relation), dim=2)
        # patchwise: channel-major (c * k * k + offset) footprint after the centre, as the official unfold
        relation = torch.cat([
            x1.reshape(batch, -1, 1, height * width),
            footprint(x2, self.kernel_size).reshape(batch, -1, 1, height * width),
        ], dim=1)
        weight = self.conv_w(relation)
        return weight.reshape(batch, -1, self.kernel_size * self.kernel_size, height * width)

    def _attend(self, x1: torch.Tensor, x2: torch.Tensor, x3: torch.Tensor) -> torch.Tensor:
        return aggregation(x3, self._weights(x1, x2), self.kernel_size)

    def _fusable(self) -> bool:
        """Whether the weight mapping is the BatchNorm / ReLU / 1x1 conv stack the fused operators fold."""
        layers = list(self.conv_w)
        return (
            len(layers) == 6
            and all(type(layers[i]) is nn.BatchNorm2d and layers[i].running_mean is not None for i in (0, 3))
            and all(type(layers[i]) is nn.ReLU for i in (1, 4))
            and all(type(layers[i]) is nn.Conv2d for i in (2, 5))
        )

    def _project(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``conv1(x), conv2(x), conv3(x)``, as one matmul on CPU where the modules are plain 1x1 convs."""
        convs = (self.conv1, self.conv2, self.conv3)
        if all(plain_conv1x1(c) for c in convs):
            x1, x2, x3 = conv1x1_split(x, [c.weight for c in convs], [c.bias for c in convs])
            return x1, x2, x3
        return self.conv1(x), self.conv2(x), self.conv3(x)

    def fused_eval(self, x: torch.Tensor) -> bool:
        """Whether ``forward`` takes the fused eval operators on this call, for input ``x``."""
        return (
            not torch.jit.is_scripting() and not self.training and self.fused and fusions_apply(x) and self._fusable())

    def forward_norm_relu(self, x: torch.Tensor, norm: nn.BatchNorm2d) -> torch.Tensor:
        """``relu(norm(self(x)))`` for an eval ``nn.BatchNorm2d``, taken chunk by chunk where ``fused_eval(x)``."""
        if self.fused_eval(x) and not (self._forward_hooks or self._forward_pre_hooks):
            return self._forward_fused(x, norm)
        return torch.relu_(norm(self(x)))

    def _forward_fused(self, x: torch.Tensor, out_norm: Optional[nn.BatchNorm2d] = None) -> torch.Tensor:
        x1, x2, x3 = self._project(x)
        bn1, conv1, bn2, conv2 = self.conv_w[0], self.conv_w[2], self.conv_w[3], self.conv_w[5]
        mapping = [
            bn1.weight, bn1.bias, bn1.running_mean, bn1.running_var, conv1.weight, conv1.bias,
            bn2.weight, bn2.bias, bn2.running_mean, bn2.running_var, conv2.weight, conv2.bias,
        ]
        norm, eps = None, 1e-5
        if out_norm is not None:
            norm, eps = [out_norm.weight, out_norm.bias, out_norm.running_mean, out_norm.running_var], out_norm.eps
        if self.conv_p is not None:
            position = self.conv_p(position_grid(x1))
            return pairwise_attention(
                x1, x2, x3, position, mapping, bn1.eps, bn2.eps, self.kernel_size, out_norm=norm, out_eps=eps)
        return patchwise_attention(
            x1, x2, x3, mapping, bn1.eps, bn2.eps, self.kernel_size, out_norm=norm, out_eps=eps)

    def _forward_recompute(self, x: torch.Tensor) -> torch.Tensor:
        calls = [0]

        def attend(x1: torch.Tensor, x2: torch.Tensor, x3: torch.Tensor) -> torch.Tensor:
            calls[0] += 1
            if calls[0] == 1:
                return self._attend(x1, x2, x3)
            # the recomputation in backward must not move the BatchNorm running statistics a second time
            buffers = [b for b in self.conv_w.buffers()]
            saved = [b.clone() for b in buffers]
            try:
                return self._attend(x1, x2, x3)
            finally:
                with torch.no_grad():
                    for b, s in zip(buffers, saved):
                        b.copy_(s)

        return torch.utils.checkpoint.checkpoint(
            attend, self.conv1(x), self.conv2(x), self.conv3(x), use_reentrant=False, preserve_rng_state=False)

    def _train_fusable(self, x: torch.Tensor) -> bool:
        """Whether training takes ``timm_san.ops_train``'s operators (CPU, the standard modules)."""
        return self._fusable() and train_supported(x, [self.conv1, self.conv2, self.conv3], self.conv_w)

    def _forward_train_fused(self, x: torch.Tensor) -> torch.Tensor:
        convs = [self.conv1, self.conv2, self.conv3]
        if self.conv_p is not None:
            position = self.conv_p(position_grid(x))
            return pairwise_attention_train(x, position, convs, self.conv_w, self.kernel_size)
        return patchwise_attention_train(x, convs, self.conv_w, self.kernel_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():
            if not self.training:
                if self.fused_eval(x):
                    return self._forward_fused(x)
            elif self.recompute and torch.is_grad_enabled() and not _tracing():
                if self._train_fusable(x):
                    return self._forward_train_fused(x)
                return self._forward_recompute(x)
        return self._attend(self.conv1(x), self.conv2(x), self.conv3(x))


def _tracing() -> bool:
    """FX and torch.compile see the plain training path (the compiler decides on recomputation itself)."""
    return torch.fx._symbolic_trace.is_fx_symbolic_tracing() or torch.compiler.is_compiling()
