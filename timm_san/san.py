""" SAN: Self-Attention Networks

Paper: "Exploring Self-attention for Image Recognition", Hengshuang Zhao, Jiaya Jia, Vladlen Koltun, CVPR 2020
    https://arxiv.org/abs/2004.13621
Official code (MIT): https://github.com/hszhao/SAN

The networks are built as the official release builds them, with its module names, so its checkpoints load
through every timm path as they are: a 1x1 conv stem at full resolution, then five stages of
2x2 max-pool, 1x1 conv to the stage width, pre-activation bottleneck blocks around a self-attention module
(SAM, in ``timm_san.sam``), BN and ReLU. Widths 64, 256, 512, 1024, 2048; footprints 3, 7, 7, 7, 7.

Where a feature map is not larger than the footprint's half-width (inputs of 96px and below, for instance),
the official CUDA kernels read out of bounds; here the reflection padding is repeated instead (see
``timm_san.ops``), which agrees with the official kernels wherever they are defined.
"""
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Type, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, calculate_drop_path_rates, create_classifier, get_device_dtype, \
    register_notrace_function
from timm.models import build_model_with_cfg, checkpoint_seq, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices

from .layers import Conv1x1, MaxPool2x2
from .ops import stem
from .sam import SA_TYPES, SelfAttention, check_design, fold_batch_stats
from .weights.checkpoint import check_state_dict, checkpoint_filter_fn, strip_data_parallel_prefix
from .weights.hub_errors import explain_pretrained_errors
from .weights.hub_ids import hf_hub_id

__all__ = ['SAN', 'SanBottleneck']

NUM_STAGES = 5
STAGE_WIDTHS = (64, 256, 512, 1024, 2048)
STAGE_KERNELS = (3, 7, 7, 7, 7)
KERNEL_SIZES = (3, 5, 7, 9, 11)  # the footprints of the paper's study

@register_notrace_function
def check_input_size(x: torch.Tensor, min_size: int = 32) -> None:
    """Refuse images too small for the five 2x2 max-pools (``min_size = 2 ** 5``), with a message that says so."""
    height, width = x.shape[-2], x.shape[-1]
    if height < min_size or width < min_size:
        raise ValueError(
            f'SAN needs input images of at least {min_size}x{min_size} pixels (five stages each halve the map '
            f'with a 2x2 max-pool), got {height}x{width}. Resize or pad the images.')


class SanBottleneck(nn.Module):
    """Pre-activation bottleneck: BN, act, SAM (width -> width / 4), BN, act, 1x1 conv back to width, + identity."""

    def __init__(
            self,
            sa_type: str,
            planes: int,
            kernel_size: int = 7,
            share_planes: int = 8,
            norm_layer: Type[nn.Module] = nn.BatchNorm2d,
            act_layer: Type[nn.Module] = nn.ReLU,
            drop_path: float = 0.,
            relation: Optional[str] = None,
            position_encoding: Optional[bool] = None,
            mapping_layers: int = 2,
            device=None,
            dtype=None,
    ):
        """
        Args:
            sa_type: 'pairwise' or 'patchwise'.
            planes: Block input and output channels.
            kernel_size: SAM footprint side.
            share_planes: Channels sharing one attention weight channel.
            norm_layer: Normalization layer.
            act_layer: Activation layer.
            drop_path: Stochastic depth rate of the residual branch.
            relation: SAM's relation function (None: as released; ``SelfAttention``).
            position_encoding: Pairwise SAM's position encoding (None: as released).
            mapping_layers: Layers of SAM's weight mapping (2 as released).
            device: Device of the parameters.
            dtype: Dtype of the parameters.
        """
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        mid_planes = planes // 4
        self.bn1 = norm_layer(planes, **dd)
        self.sam = SelfAttention(
            sa_type, planes, planes // 16, mid_planes, share_planes, kernel_size, norm_layer=norm_layer,
            relation=relation, position_encoding=position_encoding, mapping_layers=mapping_layers, **dd)
        self.bn2 = norm_layer(mid_planes, **dd)
        self.conv = Conv1x1(mid_planes, planes, **dd)
        self.act = act_layer(inplace=True)
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.bn1(x))
        out = self.act(self.bn2(self.sam(out)))
        out = self.conv(out)
        out = self.drop_path(out)
        out += x
        return out


class SanLayer(nn.Sequential):
    """The blocks of one stage (the official ``layerN``), with optional gradient checkpointing."""

    def __init__(self, *blocks: nn.Module):
        super().__init__(*blocks)
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self, x)
        for block in self:
            x = block(x)
        return x


class SAN(nn.Module):
    """Self-Attention Network (SAN).

    Module names are those of the official release (``conv_in``, ``bn_in``, ``convN``, ``layerN``, ``bnN``,
    ``fc``); the parameter-free pools and activations are registered per stage in execution order so that
    timm's feature wrappers can walk the model. ``forward`` computes ``pool0(act_in(bn_in(conv_in(x))))`` as one
    operator (``timm_san.ops.stem``), with those modules' tensors.
    """
    __jit_ignored_attributes__ = ['design_args']  # a plain dict of model arguments, not model state

    def __init__(
            self,
            sa_type: str = 'pairwise',
            layers: Sequence[int] = (2, 1, 2, 4, 1),
            kernels: Sequence[int] = STAGE_KERNELS,
            num_classes: int = 1000,
            in_chans: int = 3,
            global_pool: str = 'avg',
            share_planes: int = 8,
            norm_layer: Type[nn.Module] = nn.BatchNorm2d,
            act_layer: Type[nn.Module] = nn.ReLU,
            drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            relation: Optional[str] = None,
            position_encoding: Optional[bool] = None,
            mapping_layers: int = 2,
            device=None,
            dtype=None,
    ):
        """
        Args:
            sa_type: 'pairwise' or 'patchwise'.
            layers: Blocks per stage (five stages).
            kernels: SAM footprint side per stage, odd, 3 to 11 (the paper's footprint study).
            num_classes: Classifier classes; 0 for no classifier.
            in_chans: Input image channels.
            global_pool: Global pooling type ('avg', 'max', 'avgmax', 'catavgmax', '' for none).
            share_planes: Channels sharing one attention weight channel.
            norm_layer: Normalization layer.
            act_layer: Activation layer of the blocks and stages (the stem's is ReLU, as in the official release).
            drop_rate: Dropout rate before the classifier.
            drop_path_rate: Stochastic depth rate, increasing linearly over the blocks up to this value.
            relation: The relation function of every SAM (the paper's Section 3): pairwise 'subtraction'
                (released), 'summation', 'hadamard', 'concatenation', 'dot'; patchwise 'concatenation' (released),
                'star', 'clique'. None: the released one.
            position_encoding: Pairwise only: the learned position encoding appended to the relation (None: True,
                as released).
            mapping_layers: Layers of the weight mapping, 1 to 3 (2 as released).
            device: Device of the parameters.
            dtype: Dtype of the parameters.
        """
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        if sa_type not in SA_TYPES:
            raise ValueError(f'sa_type must be one of {SA_TYPES}, got {sa_type!r}.')
        if len(layers) != NUM_STAGES or len(kernels) != NUM_STAGES:
            raise ValueError(f'layers and kernels need {NUM_STAGES} entries, got {list(layers)} and {list(kernels)}.')
        if any(k not in KERNEL_SIZES for k in kernels):
            raise ValueError(f'kernels={tuple(kernels)}: each footprint must be one of {KERNEL_SIZES} (odd, 3 to 11).')
        check_design(sa_type, relation, position_encoding, mapping_layers)
        # the design-space arguments that differ from the release: pass them as timm's model_args when saving
        # (timm.models.push_to_hf_hub / save_for_hf) and the saved model rebuilds as this one
        design = dict(relation=relation, position_encoding=position_encoding, mapping_layers=mapping_layers,
                      kernels=tuple(kernels))
        released = dict(relation=None, position_encoding=None, mapping_layers=2, kernels=STAGE_KERNELS)
        self.design_args = {k: v for k, v in design.items() if v != released[k]}
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        self.grad_checkpointing = False

        self.conv_in = nn.Conv2d(in_chans, STAGE_WIDTHS[0], kernel_size=1, bias=False, **dd)
        self.bn_in = norm_layer(STAGE_WIDTHS[0], **dd)
        self.act_in = nn.ReLU(inplace=True)

        dpr = calculate_drop_path_rates(drop_path_rate, list(layers), stagewise=True)
        self.feature_info: List[Dict[str, Any]] = []
        prev_width = STAGE_WIDTHS[0]
        for i, (width, depth, kernel_size) in enumerate(zip(STAGE_WIDTHS, layers, kernels)):
            blocks = [
                SanBottleneck(
                    sa_type, width, kernel_size, share_planes, norm_layer=norm_layer, act_layer=act_layer,
                    drop_path=dpr[i][j], relation=relation, position_encoding=position_encoding,
                    mapping_layers=mapping_layers, **dd)
                for j in range(depth)]
            self.add_module(f'pool{i}', MaxPool2x2())
            self.add_module(f'conv{i}', Conv1x1(prev_width, width, bias=False, **dd))
            self.add_module(f'layer{i}', SanLayer(*blocks))
            self.add_module(f'bn{i}', norm_layer(width, **dd))
            self.add_module(f'act{i}', act_layer(inplace=True))
            self.feature_info.append(dict(num_chs=width, reduction=2 ** (i + 1), module=f'act{i}'))
            prev_width = width

        self.num_features = prev_width
        self.global_pool, self.fc = create_classifier(self.num_features, num_classes, pool_type=global_pool, **dd)
        self.head_hidden_size = self.num_features * self.global_pool.feat_mult()

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):
        """``nn.Module.load_state_dict`` that takes official checkpoints as they are and refuses misfits whole.

        The ``module.`` prefix of the official (DataParallel) checkpoints is stripped; a state dict that does not
        fit raises ``CheckpointMismatchError`` naming what is missing, unexpected or mis-shaped, before any
        tensor is copied (PyTorch would copy the fitting ones first and leave the model half loaded).
        """
        state_dict = {strip_data_parallel_prefix(k): v for k, v in state_dict.items()}
        name = getattr(self, 'pretrained_cfg', {}).get('architecture')
        check_state_dict(self, state_dict, strict=strict, model_name=name)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        """Regex patterns grouping parameters by stem and stage (coarse) or block (fine).

        Args:
            coarse: Group by stage instead of by block.

        Returns:
            Dict of group name to pattern(s), as timm's ``group_parameters`` takes them.
        """
        if coarse:
            blocks = r'^(?:conv|layer|bn)(\d+)\.'
        else:
            blocks = [(r'^conv(\d+)\.', (0,)), (r'^layer(\d+)\.(\d+)\.', None), (r'^bn(\d+)\.', (99999,))]
        return dict(stem=r'^conv_in\.|^bn_in\.', blocks=blocks)

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Enable or disable gradient checkpointing of the blocks.

        Args:
            enable: Whether to checkpoint.
        """
        self.grad_checkpointing = enable
        for i in range(NUM_STAGES):
            layer = getattr(self, f'layer{i}')
            if isinstance(layer, SanLayer):
                layer.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self, name_only: bool = False) -> Union[str, nn.Module]:
        """The classifier module, or its name.

        Args:
            name_only: Return the name instead of the module.
        """
        return 'fc' if name_only else self.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """Replace the classifier (and optionally the pooling).

        Args:
            num_classes: Classes of the new classifier; 0 for none.
            global_pool: New pooling type; the current one is kept if None.
        """
        self.num_classes = num_classes
        if global_pool is None:
            global_pool = self.global_pool.pool_type
        self.global_pool, self.fc = create_classifier(
            self.num_features, num_classes, pool_type=global_pool, **get_device_dtype(self))
        self.head_hidden_size = self.num_features * self.global_pool.feat_mult()
        # new modules start in training mode; keep the model's
        self.global_pool.train(self.training)
        self.fc.train(self.training)

    def _stage_names(self, index: int) -> Tuple[str, ...]:
        return f'pool{index}', f'conv{index}', f'layer{index}', f'bn{index}', f'act{index}'

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Forward features, also returning the outputs of the selected stages.

        Args:
            x: Input images.
            indices: Last n stages if int, all if None, these stages if a sequence.
            norm: Unused (each stage ends in its own norm and activation).
            stop_early: Stop after the last selected stage.
            output_fmt: Intermediate format; only 'NCHW'.
            intermediates_only: Return only the intermediates.

        Returns:
            The intermediates, or the final features and the intermediates.
        """
        if output_fmt != 'NCHW':
            raise ValueError(f"output_fmt must be 'NCHW', got {output_fmt!r}.")
        take_indices, max_index = feature_take_indices(NUM_STAGES, indices)
        check_input_size(x)
        last = max_index if stop_early else NUM_STAGES - 1
        x, intermediates = self._forward_stages(x, last, take_indices)
        if intermediates_only:
            return intermediates
        return x, intermediates

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> List[int]:
        """Drop the stages after the last selected one (and the head).

        Args:
            indices: Stages to keep output for.
            prune_norm: Unused (the norms belong to the stages).
            prune_head: Remove the classifier and pooling.

        Returns:
            The selected stage indices.
        """
        take_indices, max_index = feature_take_indices(NUM_STAGES, indices)
        for i in range(max_index + 1, NUM_STAGES):
            for name in self._stage_names(i):
                setattr(self, name, nn.Identity())
        if prune_head:
            self.reset_classifier(0, '')
        return take_indices

    def _stem_pool(self, x: torch.Tensor) -> torch.Tensor:
        """``pool0(act_in(bn_in(conv_in(x))))`` as one operator (the full-resolution map is never written whole)."""
        bn = self.bn_in
        # as nn.BatchNorm2d decides it; a norm without momentum (timm's FrozenBatchNorm2d) keeps its statistics
        batch_stats = (bn.training and hasattr(bn, 'momentum')) or bn.running_mean is None
        out, stats = stem(
            x, self.conv_in.weight, self.conv_in.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.eps,
            batch_stats)
        if batch_stats:
            planes = self.conv_in.weight.shape[0]
            fold_batch_stats(
                bn.running_mean, bn.running_var, bn.num_batches_tracked, bn.momentum, stats[:planes], stats[planes:],
                x.shape[0])
        return out

    def _forward_stages(
            self, x: torch.Tensor, last: int, take_indices: List[int]) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """Stem and stages ``0..last``, and the outputs of the stages in ``take_indices``."""
        x = self._stem_pool(x)
        intermediates: List[torch.Tensor] = []
        for i in range(last + 1):
            pool, conv, layer, bn, act = [getattr(self, name) for name in self._stage_names(i)]
            x = act(bn(layer(conv(x if i == 0 else pool(x)))))
            if i in take_indices:
                intermediates.append(x)
        return x, intermediates

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        check_input_size(x)
        x = self._stem_pool(x)
        x = self.act0(self.bn0(self.layer0(self.conv0(x))))
        x = self.act1(self.bn1(self.layer1(self.conv1(self.pool1(x)))))
        x = self.act2(self.bn2(self.layer2(self.conv2(self.pool2(x)))))
        x = self.act3(self.bn3(self.layer3(self.conv3(self.pool3(x)))))
        x = self.act4(self.bn4(self.layer4(self.conv4(self.pool4(x)))))
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x)
        if self.drop_rate:
            x = F.dropout(x, p=float(self.drop_rate), training=self.training)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_features(x)
        x = self.forward_head(x)
        return x


def _create_san(variant: str, pretrained: bool = False, **kwargs) -> SAN:
    with explain_pretrained_errors(variant, pretrained, kwargs):
        return build_model_with_cfg(
            SAN, variant, pretrained,
            pretrained_filter_fn=checkpoint_filter_fn,
            feature_cfg=dict(out_indices=(0, 1, 2, 3, 4)),
            **kwargs,
        )


def _cfg(**kwargs) -> Dict[str, Any]:
    return {
        'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': (7, 7),
        'crop_pct': 0.875, 'interpolation': 'bilinear',
        'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'conv_in', 'classifier': 'fc',
        'license': 'mit', 'origin_url': 'https://github.com/hszhao/SAN',
        'paper_ids': 'arXiv:2004.13621', 'paper_name': 'Exploring Self-attention for Image Recognition',
        **kwargs,
    }


default_cfgs = generate_default_cfgs({
    f'{name}.orig_in1k': _cfg(hf_hub_id=hf_hub_id(f'{name}.orig_in1k'))
    for name in (
        'san10_pairwise', 'san10_patchwise', 'san15_pairwise', 'san15_patchwise', 'san19_pairwise', 'san19_patchwise')
})


def _san(variant: str, sa_type: str, layers: Tuple[int, ...], pretrained: bool, **kwargs) -> SAN:
    model_args = dict(sa_type=sa_type, layers=layers, kernels=STAGE_KERNELS)
    return _create_san(variant, pretrained, **dict(model_args, **kwargs))


_SAN10, _SAN15, _SAN19 = (2, 1, 2, 4, 1), (3, 2, 3, 5, 2), (3, 3, 4, 6, 3)


@register_model
def san10_pairwise(pretrained: bool = False, **kwargs) -> SAN:
    """SAN10 pairwise (10.5M params, 74.9 top-1 in the paper)."""
    return _san('san10_pairwise', 'pairwise', _SAN10, pretrained, **kwargs)


@register_model
def san10_patchwise(pretrained: bool = False, **kwargs) -> SAN:
    """SAN10 patchwise (11.8M params, 77.1 top-1 in the paper)."""
    return _san('san10_patchwise', 'patchwise', _SAN10, pretrained, **kwargs)


@register_model
def san15_pairwise(pretrained: bool = False, **kwargs) -> SAN:
    """SAN15 pairwise (14.1M params, 76.6 top-1 in the paper)."""
    return _san('san15_pairwise', 'pairwise', _SAN15, pretrained, **kwargs)


@register_model
def san15_patchwise(pretrained: bool = False, **kwargs) -> SAN:
    """SAN15 patchwise (16.2M params, 78.0 top-1 in the paper)."""
    return _san('san15_patchwise', 'patchwise', _SAN15, pretrained, **kwargs)


@register_model
def san19_pairwise(pretrained: bool = False, **kwargs) -> SAN:
    """SAN19 pairwise (17.6M params, 76.9 top-1 in the paper)."""
    return _san('san19_pairwise', 'pairwise', _SAN19, pretrained, **kwargs)


@register_model
def san19_patchwise(pretrained: bool = False, **kwargs) -> SAN:
    """SAN19 patchwise (20.5M params, 78.2 top-1 in the paper)."""
    return _san('san19_patchwise', 'patchwise', _SAN19, pretrained, **kwargs)
