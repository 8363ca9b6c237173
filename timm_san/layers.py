""" Layers of SAN whose arithmetic is one of ``timm_san.ops``' operators: the same modules, parameters and
state_dict keys as ``nn.Conv2d`` / ``nn.MaxPool2d``; the operator picks the kernel (see ``timm_san.ops``). """
import torch
import torch.nn as nn

from .ops import conv1x1, max_pool2x2

__all__ = ['Conv1x1', 'MaxPool2x2']


class Conv1x1(nn.Conv2d):
    """``nn.Conv2d`` with a 1x1 kernel (no stride, padding, dilation or groups), computed by ``ops.conv1x1``."""

    def __init__(self, in_channels: int, out_channels: int, bias: bool = True, device=None, dtype=None):
        super().__init__(in_channels, out_channels, kernel_size=1, bias=bias, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return conv1x1(x, self.weight, self.bias)


class MaxPool2x2(nn.MaxPool2d):
    """``nn.MaxPool2d(2, 2)``, computed by ``ops.max_pool2x2``."""

    def __init__(self):
        super().__init__(kernel_size=2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return max_pool2x2(x)
