""" Clear errors for SAN pretrained weights that cannot be fetched from the Hugging Face Hub or read

A damaged ``model.safetensors`` (in the cache, on the Hub, or in a ``local-dir:`` folder), a missing repository
or file, and an empty cache in offline mode each end in a message that says where the weights were looked for
and what to do.
"""
import os
import re
from contextlib import contextmanager
from typing import Any, Dict, Iterator, Optional

from huggingface_hub import constants as hf_constants, try_to_load_from_cache
from huggingface_hub.errors import (
    LocalEntryNotFoundError, RemoteEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError)
from huggingface_hub.utils.sha import sha_fileobj
from safetensors import SafetensorError

from .checkpoint import CheckpointReadError

__all__ = ['explain_pretrained_errors']


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
