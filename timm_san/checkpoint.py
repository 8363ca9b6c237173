""" Reading and checking checkpoints of the official SAN release (and of timm-san)

The official checkpoints are pickles written by ``torch.save``:
``{'epoch', 'state_dict', 'optimizer', 'scheduler', 'top1_val', 'top5_val'}``, with the ``state_dict`` keys
prefixed ``module.`` by DataParallel. timm's own loaders already unwrap ``state_dict`` and strip ``module.``;
the helpers here cover direct ``load_state_dict`` calls and make a checkpoint that does not fit the model fail
before anything is copied, with a message that says what does not fit.
"""
import os
import pickle
import re
from collections import Counter
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch

__all__ = [
    'CheckpointMismatchError', 'CheckpointReadError', 'load_official_checkpoint', 'unwrap_state_dict',
    'describe_san_state_dict', 'check_state_dict', 'checkpoint_filter_fn', 'strip_data_parallel_prefix',
]

_DATA_PARALLEL_PREFIX = 'module.'
_SAN_STEM_KEY = 'conv_in.weight'
_BLOCK_KEY = re.compile(r'^layer(\d)\.(\d+)\.')
_SHOWN = 5


class CheckpointMismatchError(RuntimeError):
    """A state dict that does not fit the model it is loaded into."""


class CheckpointReadError(RuntimeError):
    """A checkpoint file that cannot be read safely or whole."""


def load_official_checkpoint(path: str) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """Read an official (or timm) SAN checkpoint safely.

    The pickle is read with ``weights_only=True``: one that would import or run code is refused.

    Args:
        path: Path of a ``.pth`` pickle written by ``torch.save``.

    Returns:
        The state dict (``module.`` stripped) and the rest of the checkpoint's top level
        (epoch, top1_val, ...; the optimizer and scheduler states are dropped).

    Raises:
        FileNotFoundError: No file at ``path``.
        CheckpointReadError: The file is truncated, not a checkpoint, or needs code to unpickle.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f'No checkpoint file at {path!r}.')
    try:
        checkpoint = torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointReadError(
            f'Refused to load {path!r}: it is a pickle that needs code or classes beyond plain tensors and '
            f'containers (weights_only=True). Official SAN checkpoints do not; if you trust this file, '
            f'convert it yourself. Detail: {str(e).splitlines()[0]}') from e
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        size = os.path.getsize(path)
        raise CheckpointReadError(
            f'Cannot read {path!r} ({size} bytes) as a torch checkpoint: the file is truncated or not a '
            f'checkpoint. Download it again and compare its sha256. Detail: {str(e).splitlines()[0]}') from e
    state_dict = unwrap_state_dict(checkpoint)
    extra = {}
    if isinstance(checkpoint, Mapping):
        extra = {k: v for k, v in checkpoint.items() if k not in ('state_dict', 'optimizer', 'scheduler')}
    return state_dict, extra


def unwrap_state_dict(checkpoint: Any) -> Dict[str, torch.Tensor]:
    """The flat state dict of a checkpoint: unnested from ``state_dict`` and stripped of ``module.``.

    Args:
        checkpoint: A loaded checkpoint (dict with ``state_dict``) or a state dict.

    Returns:
        A new dict of tensors.

    Raises:
        CheckpointReadError: ``checkpoint`` holds no state dict.
    """
    if isinstance(checkpoint, Mapping) and 'state_dict' in checkpoint:
        checkpoint = checkpoint['state_dict']
    if not isinstance(checkpoint, Mapping) or not all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        raise CheckpointReadError(
            'The checkpoint holds no state dict: expected a dict of tensors, or a dict with a "state_dict" entry '
            'of tensors, as torch.save writes for the official SAN release.')
    return {strip_data_parallel_prefix(k): v for k, v in checkpoint.items()}


def strip_data_parallel_prefix(key: str) -> str:
    """``key`` without the ``module.`` prefix that (Distributed)DataParallel adds."""
    return key[len(_DATA_PARALLEL_PREFIX):] if key.startswith(_DATA_PARALLEL_PREFIX) else key


def describe_san_state_dict(state_dict: Mapping[str, Any]) -> Optional[str]:
    """Which SAN a state dict holds, e.g. ``'pairwise, blocks [2, 1, 2, 4, 1] (san10_pairwise)'``.

    Args:
        state_dict: Flat state dict (no ``module.`` prefix).

    Returns:
        The description, or None when the keys are not those of a SAN.
    """
    if _SAN_STEM_KEY not in state_dict:
        return None
    blocks: Dict[int, set] = {}
    for key in state_dict:
        m = _BLOCK_KEY.match(key)
        if m:
            blocks.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
    layers = [len(blocks.get(i, ())) for i in range(5)]
    sa_type = 'pairwise' if any('.sam.conv_p.' in k for k in state_dict) else 'patchwise'
    known = {(2, 1, 2, 4, 1): 'san10', (3, 2, 3, 5, 2): 'san15', (3, 3, 4, 6, 3): 'san19'}
    name = known.get(tuple(layers))
    return f'{sa_type}, blocks {layers}' + (f' ({name}_{sa_type})' if name else '')


def _examples(keys: List[str]) -> str:
    shown = ', '.join(keys[:_SHOWN])
    return shown + (f', ... ({len(keys) - _SHOWN} more)' if len(keys) > _SHOWN else '')


def check_state_dict(
        model: torch.nn.Module,
        state_dict: Mapping[str, Any],
        prefix: str = '',
        strict: bool = True,
        model_name: Optional[str] = None,
) -> None:
    """Raise before loading when ``state_dict`` does not fit ``model``.

    Args:
        model: The module the state dict is loaded into.
        state_dict: The state dict, keys carrying ``prefix``.
        prefix: Prefix of the module's keys in ``state_dict``.
        strict: Whether missing and unexpected keys are errors (shape mismatches always are).
        model_name: Name of the model for the message.

    Raises:
        CheckpointMismatchError: Naming the missing, unexpected and mis-shaped keys and, where it can tell,
            which SAN the checkpoint holds.
    """
    expected = {k: v.shape for k, v in model.state_dict().items()}
    given = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    missing = [k for k in expected if k not in given] if strict else []
    unexpected = [k for k in given if k not in expected] if strict else []
    mismatched = [
        f'{k}: checkpoint {list(v.shape)} vs model {list(expected[k])}'
        for k, v in given.items() if k in expected and isinstance(v, torch.Tensor) and v.shape != expected[k]]
    if not (missing or unexpected or mismatched):
        return
    name = model_name or type(model).__name__
    lines = [f'The checkpoint does not fit {name}.']
    held = describe_san_state_dict(given)
    if held is None:
        counts = Counter(k.split('.')[0] for k in given)
        tops = ', '.join(k for k, _ in counts.most_common(_SHOWN)) or 'nothing'
        lines.append(f'It does not hold SAN weights (no {_SAN_STEM_KEY}; its top-level names: {tops}).')
    else:
        lines.append(f'It holds SAN weights: {held}.')
    if missing:
        lines.append(f'Missing {len(missing)} key(s): {_examples(missing)}.')
    if unexpected:
        lines.append(f'Unexpected {len(unexpected)} key(s): {_examples(unexpected)}.')
    if mismatched:
        lines.append(f'{len(mismatched)} shape mismatch(es): {_examples(mismatched)}.')
    lines.append(
        'Create the model the checkpoint was trained as (see timm.list_models("san*")), or for a different head '
        'pass num_classes=... with pretrained=True so timm drops the classifier.')
    raise CheckpointMismatchError(' '.join(lines))


def checkpoint_filter_fn(state_dict: Mapping[str, Any], model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """timm ``pretrained_filter_fn``: accept official checkpoints (nested, ``module.``-prefixed) as they are.

    Args:
        state_dict: Loaded checkpoint or state dict.
        model: Model being loaded (unused; part of timm's filter signature).

    Returns:
        Flat state dict with the model's key names.
    """
    return unwrap_state_dict(state_dict)

