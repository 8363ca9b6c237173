""" Reading and checking checkpoints of the official SAN release (and of timm-san)

The official checkpoints are pickles written by ``torch.save``:
``{'epoch', 'state_dict', 'optimizer', 'scheduler', 'top1_val', 'top5_val'}``, with the ``state_dict`` keys
prefixed ``module.`` by DataParallel. timm's own loaders already unwrap ``state_dict`` and strip ``module.``;
the helpers here cover direct ``load_state_dict`` calls and make a checkpoint that does not fit the model fail
before anything is copied, with a message that says what does not fit. ``explain_pretrained_errors`` does the same
for the weights timm fetches from the Hugging Face Hub or a local folder: a damaged file, a missing repository or
file each end in a message that says where the weights were looked for and what to do.
"""
import os
import pickle
import re
from collections import Counter
from contextlib import contextmanager
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple

import torch
from huggingface_hub import constants as hf_constants, try_to_load_from_cache
from huggingface_hub.errors import (
    LocalEntryNotFoundError, RemoteEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError)
from huggingface_hub.utils.sha import sha_fileobj
from safetensors import SafetensorError

__all__ = [
    'CheckpointMismatchError', 'CheckpointReadError', 'load_official_checkpoint', 'unwrap_state_dict',
    'describe_san_state_dict', 'check_state_dict', 'checkpoint_filter_fn', 'strip_data_parallel_prefix',
    'explain_pretrained_errors',
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


_WEIGHTS_FILE = 'model.safetensors'
_SHA256_NAME = re.compile(r'^[0-9a-f]{64}$')


def _damaged_download_advice(hub_id: str, revision: Optional[str]) -> str:
    """What to say about a cached download that is not valid safetensors: damaged in transfer, or on the Hub."""
    cached = try_to_load_from_cache(hub_id, _WEIGHTS_FILE, revision=revision)
    if not isinstance(cached, str):
        return f'Load again; if it fails the same way, the file in {hub_id} on {hf_constants.ENDPOINT} is damaged.'
    blob = os.path.realpath(cached)
    repo_cache = cached.split(f'{os.sep}snapshots{os.sep}')[0]
    announced = os.path.basename(blob)  # huggingface_hub names an LFS blob after the sha256 the Hub announced
    with open(blob, 'rb') as f:
        actual = sha_fileobj(f).hex()
    if _SHA256_NAME.match(announced) and actual != announced:
        return (f'The downloaded copy {cached} ({os.path.getsize(blob)} bytes) is damaged: its sha256 is {actual}, '
                f'the Hub announced {announced}. Delete {repo_cache} and load again to download it afresh.')
    return (f'The downloaded copy {cached} is what the Hub serves (sha256 {actual}), so the file in {hub_id} on '
            f'{hf_constants.ENDPOINT} is itself damaged: publish it again (hub/publish.py), or point at a mirror '
            f'(HF_ENDPOINT) or a converted folder (local-dir:). Then delete {repo_cache} and load again.')


@contextmanager
def explain_pretrained_errors(
        variant: str,
        pretrained_cfg: Any = None,
        pretrained_cfg_overlay: Optional[Dict[str, Any]] = None,
) -> Iterator[None]:
    """Turn a failure to fetch or read a SAN's pretrained weights into an error that says where and what to do.

    A ``model.safetensors`` that is not valid safetensors (truncated, corrupt) raises ``CheckpointReadError``
    naming the file and telling a damaged download from a damaged file on the Hub; a missing repository,
    revision or file keeps huggingface_hub's error and gains a note naming the Hub endpoint and the ways to
    point the SAN weights elsewhere.

    Args:
        variant: Architecture being created.
        pretrained_cfg: The ``pretrained_cfg`` given to the model factory, if any.
        pretrained_cfg_overlay: The ``pretrained_cfg_overlay`` given to it, if any.
    """
    try:
        yield
    except SafetensorError as e:
        from timm.models import resolve_pretrained_cfg  # deferred: timm.models imports the model modules
        cfg = resolve_pretrained_cfg(variant, pretrained_cfg, pretrained_cfg_overlay)
        if cfg.source == 'local-dir':
            where = os.path.join(cfg.file or '', _WEIGHTS_FILE)
            advice = 'Write the folder again (python hub/convert.py ...).'
        else:
            hub_id, _, revision = (cfg.hf_hub_id or '').partition('@')
            where = f'{_WEIGHTS_FILE} of {hub_id}'
            advice = _damaged_download_advice(hub_id, revision or None)
        raise CheckpointReadError(
            f'The pretrained weights of {variant} ({where}) are not a valid safetensors file: it is truncated or '
            f'corrupt ({e}). {advice}') from e
    except (RepositoryNotFoundError, RevisionNotFoundError, RemoteEntryNotFoundError, LocalEntryNotFoundError) as e:
        if hasattr(e, 'add_note'):  # Python 3.11+
            from timm.models import resolve_pretrained_cfg
            hub_id = resolve_pretrained_cfg(variant, pretrained_cfg, pretrained_cfg_overlay).hf_hub_id
            elsewhere = (
                'HF_ENDPOINT (a mirror), TIMM_SAN_HF_HUB_ORG (another organisation), or '
                'timm.create_model("local-dir:DIR", pretrained=True) for a folder written by hub/convert.py')
            if isinstance(e, LocalEntryNotFoundError):
                e.add_note(
                    f'timm-san: the pretrained weights of {variant} ({hub_id}) are not in the cache '
                    f'{hf_constants.HF_HUB_CACHE} and could not be fetched from {hf_constants.ENDPOINT}'
                    f'{" because offline mode (HF_HUB_OFFLINE) is on" if hf_constants.HF_HUB_OFFLINE else ""}. '
                    f'Load them once online, or point them elsewhere with {elsewhere}.')
            else:
                e.add_note(
                    f'timm-san: the pretrained weights of {variant} were looked for in {hub_id} on '
                    f'{hf_constants.ENDPOINT} (timm tries {_WEIGHTS_FILE}, then pytorch_model.bin). Point them '
                    f'elsewhere with {elsewhere}.')
        raise
