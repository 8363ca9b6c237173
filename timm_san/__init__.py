""" timm-san: SAN self-attention networks (Zhao, Jia, Koltun, CVPR 2020) as timm models

``import timm_san`` registers ``san10_pairwise``, ``san10_patchwise``, ``san15_*`` and ``san19_*`` in timm's
model registry, so ``timm.create_model('san10_patchwise', pretrained=True)`` works as for any timm model.
"""
from .version import __version__
from .san import SAN, SanBottleneck
from .sam import SelfAttention
from . import ops

__all__ = ['__version__', 'SAN', 'SanBottleneck', 'SelfAttention', 'ops']
