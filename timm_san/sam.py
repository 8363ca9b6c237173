""" Self-attention module (SAM) of SAN, pairwise and patchwise

"Exploring Self-attention for Image Recognition", Zhao, Jia, Koltun, CVPR 2020 (https://arxiv.org/abs/2004.13621)

Submodule names (``conv1``, ``conv2``, ``conv3``, ``conv_w.N``, ``conv_p``) are those of the official release,
so its checkpoints load as they are. The module holds the parameters; its arithmetic is one call of
``timm_san.ops.pairwise_attention`` / ``patchwise_attention``, which pick the kernel that computes it.
"""
from typing import List, Optional, Tuple, Type

import torch
import torch.nn as nn
from timm.layers import register_notrace_function, register_notrace_module

from .kernels.reference import check_kernel_size
from .ops import PAIR_RELATIONS, PATCH_RELATIONS, pairwise_attention, patchwise_attention, position_grid

__all__ = ['SelfAttention', 'SA_TYPES', 'RELATIONS', 'MAPPING_LAYERS', 'relation_channels', 'check_design']

SA_TYPES = ('pairwise', 'patchwise')
# the relation functions of the paper's Section 3 by attention type, the released one first
RELATIONS = {'pairwise': PAIR_RELATIONS, 'patchwise': PATCH_RELATIONS}
MAPPING_LAYERS = (1, 2, 3)


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


# FX keeps SAM as one call: its forward gathers a list of tensors per mapping layer, which FX would write out as
# list literals that TorchScript types too narrowly (List[Tensor], where None may stand)
@register_notrace_module
class SelfAttention(nn.Module):
    """SAM: local self-attention over a ``k x k`` footprint, weights shared by ``share_planes`` channels.

    Pairwise: the weight of each neighbour is a mapping of the subtraction relation
    ``conv1(x)[centre] - conv2(x)[neighbour]`` (with the same difference of a learned position encoding),
    normalised by a softmax over the footprint.
    Patchwise: the weights of the whole footprint are a mapping of ``conv1(x)`` at the centre concatenated with
    ``conv2(x)`` over the footprint, not normalised.
    Either way the output is the weighted sum of ``conv3(x)`` over the footprint.

    The paper's design space: another ``relation`` (``RELATIONS``), no ``position_encoding`` (pairwise), one to
    three ``mapping_layers`` (each BatchNorm, ReLU, 1x1 conv; the last with a bias). The defaults are the release.
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
            relation: Optional[str] = None,
            position_encoding: Optional[bool] = None,
            mapping_layers: int = 2,
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
            relation: The relation function, one of ``RELATIONS[sa_type]`` (None: the released one, subtraction
                for pairwise, concatenation for patchwise).
            position_encoding: Pairwise only: append the learned position encoding's difference to the relation
                (None: True for pairwise, as released).
            mapping_layers: The weight mapping's number of layers, 1 to 3 (2 as released).
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
        relation, position_encoding = check_design(sa_type, relation, position_encoding, mapping_layers)
        self.sa_type = sa_type
        self.kernel_size = kernel_size
        self.relation = RELATIONS[sa_type].index(relation)
        weight_planes = out_planes // share_planes
        num_offsets = kernel_size * kernel_size

        self.conv1 = nn.Conv2d(in_planes, rel_planes, kernel_size=1, **dd)
        self.conv2 = nn.Conv2d(in_planes, rel_planes, kernel_size=1, **dd)
        self.conv3 = nn.Conv2d(in_planes, out_planes, kernel_size=1, **dd)
        relation_planes = relation_channels(sa_type, relation, rel_planes, kernel_size) + 2 * position_encoding
        if sa_type == 'pairwise':
            widths = [relation_planes] + [rel_planes] * (mapping_layers - 1) + [weight_planes]
        else:
            widths = [relation_planes] + [weight_planes] * (mapping_layers - 1) + [num_offsets * weight_planes]
        mapping: List[nn.Module] = []
        for layer, (planes, out) in enumerate(zip(widths[:-1], widths[1:])):
            mapping += [
                norm_layer(planes, **dd),
                nn.ReLU(inplace=True),
                nn.Conv2d(planes, out, kernel_size=1, bias=layer == mapping_layers - 1, **dd),
            ]
        self.conv_w = nn.Sequential(*mapping)
        self.conv_p = nn.Conv2d(2, 2, kernel_size=1, **dd) if position_encoding else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        params: List[Optional[torch.Tensor]] = [
            self.conv1.weight, self.conv1.bias, self.conv2.weight, self.conv2.bias, self.conv3.weight,
            self.conv3.bias]
        running: List[Optional[torch.Tensor]] = []
        eps: List[float] = []
        batch_stats: List[bool] = []
        # the mapping is (norm, ReLU, conv) per layer; norms have an eps, convs a kernel size, the ReLUs neither
        for module in self.conv_w:
            if hasattr(module, 'eps'):
                # one by one: TorchScript types a list literal as List[Tensor], not List[Optional[Tensor]]
                params.append(module.weight)
                params.append(module.bias)
                running.append(module.running_mean)
                running.append(module.running_var)
                eps.append(module.eps)
                # as nn.BatchNorm2d decides it; a norm without momentum (timm's FrozenBatchNorm2d) keeps its
                # statistics
                batch_stats.append((module.training and hasattr(module, 'momentum')) or module.running_mean is None)
            elif hasattr(module, 'kernel_size'):
                params.append(module.weight)
                params.append(module.bias)
        if self.conv_p is not None:
            position = self.conv_p(position_grid(x))
            out, stats = pairwise_attention(
                x, params, running, position, self.kernel_size, eps, batch_stats, self.relation)
        elif self.sa_type == 'pairwise':
            out, stats = pairwise_attention(x, params, running, None, self.kernel_size, eps, batch_stats, self.relation)
        else:
            out, stats = patchwise_attention(x, params, running, self.kernel_size, eps, batch_stats, self.relation)
        # the statistics of the norms on batch statistics, [mean, var] each in order, as their own forward would
        # fold them into their running statistics
        offset, norm = 0, 0
        for module in self.conv_w:
            if hasattr(module, 'eps'):
                if batch_stats[norm]:
                    planes = module.num_features
                    fold_batch_stats(
                        module.running_mean, module.running_var, module.num_batches_tracked, module.momentum,
                        stats[offset:offset + planes], stats[offset + planes:offset + 2 * planes], x.shape[0])
                    offset += 2 * planes
                norm += 1
        return out


def relation_channels(sa_type: str, relation: str, rel_planes: int, kernel_size: int) -> int:
    """The channels a relation gives the weight mapping (pairwise: per footprint offset; patchwise: per pixel),
    before the position encoding's two."""
    offsets = kernel_size * kernel_size
    if sa_type == 'pairwise':
        return {'concatenation': 2 * rel_planes, 'dot': 1}.get(relation, rel_planes)
    return {'star': offsets, 'clique': offsets * offsets}.get(relation, rel_planes * (offsets + 1))


def check_design(
        sa_type: str, relation: Optional[str], position_encoding: Optional[bool], mapping_layers: int,
) -> Tuple[str, bool]:
    """The relation and position encoding a SAM of ``sa_type`` is built with (None: as released), or a
    ``ValueError`` that names the argument, its value and what is allowed."""
    relations = RELATIONS[sa_type]
    if relation is None:
        relation = relations[0]
    if relation not in relations:
        other = next((t for t, names in RELATIONS.items() if relation in names), None)
        hint = f' ({relation!r} is a {other} relation)' if other else ''
        raise ValueError(f'relation={relation!r} is not a {sa_type} relation{hint}; {sa_type} takes {relations}.')
    if position_encoding is None:
        position_encoding = sa_type == 'pairwise'
    if position_encoding and sa_type != 'pairwise':
        raise ValueError(f'position_encoding=True is for pairwise attention only; {sa_type} has none (leave it '
                         f'unset or False).')
    if mapping_layers not in MAPPING_LAYERS:
        raise ValueError(f'mapping_layers={mapping_layers!r} is outside {MAPPING_LAYERS}: the weight mapping has one '
                         f'to three layers (2 as released).')
    return relation, bool(position_encoding)
