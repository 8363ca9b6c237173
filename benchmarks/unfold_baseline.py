""" The plain unfold implementation of SAN, the baseline of the benchmark

Every public port of the official CUDA operators writes them with ``F.unfold``, materialising ``k * k`` copies of
each feature map. ``tests/reference.py`` holds exactly that arithmetic (module for module, with the official
names, so a timm_san state dict loads into it); this module only makes it importable from the benchmark.
"""
import os
import sys

import torch.nn as nn

_TESTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'tests')


def unfold_model(name: str, num_classes: int = 1000) -> nn.Module:
    """The unfold reference network of ``name`` (e.g. ``'san10_pairwise'``), default initialised.

    Args:
        name: SAN model name.
        num_classes: Classifier classes.

    Returns:
        The unfold network, with the official module names.
    """
    if _TESTS not in sys.path:
        sys.path.insert(0, _TESTS)
    from reference import official_model
    return official_model(name, num_classes=num_classes)
