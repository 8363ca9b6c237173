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
import zipfile
from collections import Counter
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
from safetensors import SafetensorError, safe_open

from ..ops import PAIR_RELATIONS
from ..sam import relation_channels

__all__ = [
    'CheckpointMismatchError', 'CheckpointReadError', 'load_official_checkpoint', 'unwrap_state_dict',
    'describe_san_state_dict', 'check_state_dict', 'checkpoint_filter_fn', 'strip_data_parallel_prefix',
    'checkpoint_file_problem', 'describe_unreadable',
]

_DATA_PARALLEL_PREFIX = 'module.'
_SAN_STEM_KEY = 'conv_in.weight'
_BLOCK_KEY = re.compile(r'^layer(\d)\.(\d+)\.')
_FIRST_MAPPING_WEIGHT = re.compile(r'^layer0\.0\.sam\.conv_w\.(\d+)\.weight$')
_SHOWN = 5
_ZIP_MAGIC = b'PK\x03\x04'  # torch.save's default format since torch 1.6
_PICKLE_PROTOCOL = b'\x80'  # a plain pickle (torch's legacy format) opens with its protocol number
_NEEDS_CODE = re.compile(r'unsupported global', re.I)  # torch's weights-only unpickler refusing an import
_UNPICKLER_DETAIL = re.compile(r'unsupported (global|operand)', re.I)


class CheckpointMismatchError(RuntimeError):
    """A state dict that does not fit the model it is loaded into."""


class CheckpointReadError(RuntimeError):
    """A checkpoint file that cannot be read safely or whole."""


def _first_line(error: BaseException) -> str:
    """The telling line of an exception's message, or its type's name when the message is empty.

    ``torch.load``'s weights-only errors open with a paragraph about the changed default; the line that says what
    was refused comes later, so it is the one taken.
    """
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    telling = [line for line in lines if _UNPICKLER_DETAIL.search(line)]
    return (telling or lines or [type(error).__name__])[0]


def _safetensors_problem(path: str) -> Optional[str]:
    """What is wrong with the header of a safetensors file, or None when it reads (the data is not checked)."""
    try:
        with safe_open(path, framework='numpy') as f:
            f.keys()
    except (SafetensorError, OSError, ValueError) as e:
        return f'it is not a valid safetensors file: truncated or corrupt ({_first_line(e)})'
    return None


def _zip_problem(path: str) -> Optional[str]:
    """What is wrong with the zip archive that ``torch.save`` writes, or None when every member reads whole."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()  # reads every member and checks its CRC
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        return f'it is a torch checkpoint (zip) that is truncated or corrupt ({_first_line(e)})'
    if bad is not None:
        return f'it is a torch checkpoint (zip) whose member {bad} is corrupt'
    return None


def checkpoint_file_problem(path: str, error: Optional[BaseException] = None) -> Optional[str]:
    """What is wrong with a checkpoint file, in words, told from the file itself rather than from a loader's error.

    Loaders describe damaged files poorly (``torch.load`` of random bytes reports a pickle that needs code, of an
    empty file an ``EOFError`` with no message), so the file is examined: missing, a folder, empty, an HTML page,
    a safetensors file whose header does not read, a torch zip that is cut short, a plain pickle (torch's legacy
    format) that ends early or is refused for needing code, or none of these formats.

    Args:
        path: The file.
        error: The error a loader raised on it, if any; used only to tell a pickle that needs code from a damaged one.

    Returns:
        The problem, e.g. ``'it is empty'``, or None when nothing is found wrong with the file.
    """
    if not os.path.lexists(path):
        return 'there is no file at that path'
    if os.path.isdir(path):
        return 'it is a folder, not a file'
    try:
        size = os.path.getsize(path)
        with open(path, 'rb') as f:
            head = f.read(64)
    except OSError as e:
        return f'it cannot be read ({_first_line(e)})'
    if size == 0:
        return 'it is empty'
    if head.lstrip()[:1] == b'<':
        return 'it is a web page or other markup, not a checkpoint'
    if path.endswith('.safetensors') or (len(head) > 8 and head[8:9] == b'{'):
        return _safetensors_problem(path)
    if head.startswith(_ZIP_MAGIC):
        problem = _zip_problem(path)
        if problem is not None:
            return problem
    elif not head.startswith(_PICKLE_PROTOCOL):
        return f'it is neither a torch checkpoint (zip or pickle) nor a safetensors file (it starts {head[:8].hex()})'
    if isinstance(error, pickle.UnpicklingError) and _NEEDS_CODE.search(str(error)):
        return ('it is a pickle that needs code or classes beyond plain tensors and containers, which '
                'weights_only=True refuses')
    if error is not None:
        return f'it is a torch checkpoint that does not read whole: truncated or corrupt ({_first_line(error)})'
    return None


def describe_unreadable(path: str, error: Optional[BaseException] = None, what: str = 'checkpoint') -> str:
    """The message for a checkpoint file that cannot be read: which file, its size and what is wrong with it.

    Args:
        path: The file.
        error: The loader's error, if any.
        what: What the file was to be, for the message (``'checkpoint'``, ``'pretrained weights of san10_pairwise'``).
    """
    problem = checkpoint_file_problem(path, error)
    if problem is None:
        problem = f'it could not be read ({_first_line(error)})' if error is not None else 'it could not be read'
    size = f', {os.path.getsize(path)} bytes' if os.path.isfile(path) else ''
    return f'Cannot read the {what} {path!r}{size}: {problem}.'


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
        CheckpointReadError: The file is empty, truncated, not a checkpoint, or needs code to unpickle; the message
            names the file and what is wrong with it.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(describe_unreadable(path))
    try:
        checkpoint = torch.load(path, map_location='cpu', weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as e:
        advice = ('Official SAN checkpoints need none; if you trust this file, convert it yourself.'
                  if 'needs code' in (checkpoint_file_problem(path, e) or '') else
                  'Download it again (timm-san download checks and converts the official files).')
        raise CheckpointReadError(f'{describe_unreadable(path, e)} {advice}') from e
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
    sa_type, design = _design_of(state_dict)
    known = {(2, 1, 2, 4, 1): 'san10', (3, 2, 3, 5, 2): 'san15', (3, 3, 4, 6, 3): 'san19'}
    name = known.get(tuple(layers))
    arguments = ', '.join(f'{k}={v!r}' for k, v in design.items())
    model = f'{name}_{sa_type}' + (f' with {arguments}' if arguments else '') if name else ''
    return f'{sa_type}, blocks {layers}' + (f', {arguments}' if arguments and not name else '') + \
        (f' ({model})' if model else '')


def _design_of(state_dict: Mapping[str, Any]) -> Tuple[str, Dict[str, Any]]:
    """The attention type of a SAN state dict, and where its first SAM is not the released design, the model
    arguments that build it (``relation``, ``position_encoding``, ``mapping_layers``), read from the shapes."""
    sam = 'layer0.0.sam.'
    position = f'{sam}conv_p.weight' in state_dict
    # the mapping's convs: conv_w.N weights of 4 dims (the norms' are vectors)
    convs = sorted(int(m.group(1)) for m in map(_FIRST_MAPPING_WEIGHT.match, state_dict)
                   if m and state_dict[m.group(0)].dim() == 4)
    if f'{sam}conv1.weight' not in state_dict or not convs:
        return ('pairwise' if position else 'patchwise'), {}
    rel_planes = state_dict[f'{sam}conv1.weight'].shape[0]
    weight_planes = state_dict[f'{sam}conv3.weight'].shape[0] // 8
    first_norm = state_dict[f'{sam}conv_w.0.weight'].shape[0] if f'{sam}conv_w.0.weight' in state_dict else None
    pairwise = position or state_dict[f'{sam}conv_w.{convs[-1]}.weight'].shape[0] == weight_planes
    design: Dict[str, Any] = {}
    if pairwise and first_norm is not None:
        # the first relation of that width: summation and hadamard have subtraction's, so they read as released
        relation = next((r for r in PAIR_RELATIONS if relation_channels('pairwise', r, rel_planes, 1) ==
                         first_norm - 2 * position), PAIR_RELATIONS[0])
        if relation != PAIR_RELATIONS[0]:
            design['relation'] = relation
        if not position:
            design['position_encoding'] = False
    if len(convs) != 2:
        design['mapping_layers'] = len(convs)
    return ('pairwise' if pairwise else 'patchwise'), design


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

