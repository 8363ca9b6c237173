""" Clear, fast errors for SAN pretrained weights that cannot be fetched or read

Where the weights are fetched from the Hugging Face Hub, one HEAD request without retries is made first when the
file is not in the cache: huggingface_hub retries a failed request with back-off, and timm, after a failure on
``model.safetensors``, tries ``pytorch_model.bin`` the same way, so an unreachable endpoint took about a minute to
fail. A repository the Hub does not have ends at once in an error whose note says that the weights are not
published at that endpoint and how to get them without it (``timm-san download``, ``local-dir:``); an
unreachable endpoint and an empty cache in offline mode say so too.

A file that cannot be read (``pretrained_cfg_overlay=dict(file=...)``, a ``local-dir:`` folder, a cached Hub
download) ends in ``CheckpointReadError`` naming the file and what is wrong with it, told from the file itself.

``hf-hub:`` model names are resolved by timm (it fetches the repository's ``config.json``) before any SAN code runs,
so timm's config loader is wrapped, for SAN repositories only, to add the same fast check and notes.
"""
import functools
import os
import re
from contextlib import contextmanager
from typing import Any, Dict, Iterator, Optional, Tuple

from huggingface_hub import constants as hf_constants, get_hf_file_metadata, hf_hub_url, try_to_load_from_cache
from huggingface_hub.errors import (
    EntryNotFoundError, GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError,
    RevisionNotFoundError)
from huggingface_hub.utils.sha import sha_fileobj
from safetensors import SafetensorError

from ..paper import PAPER_RESULTS
from .checkpoint import CheckpointMismatchError, CheckpointReadError, checkpoint_file_problem, describe_unreadable

__all__ = ['explain_pretrained_errors', 'pretrained_error_summary', 'NOTE_PREFIX']

NOTE_PREFIX = 'timm-san: '
_WEIGHTS_FILE = 'model.safetensors'
_CONFIG_FILE = 'config.json'
_SHA256_NAME = re.compile(r'^[0-9a-f]{64}$')
# what timm's local-dir loader looks for in a folder, in its order (timm.models._hub._PREFERRED_FILES)
_LOCAL_DIR_FILES = ('model.safetensors', 'pytorch_model.bin', 'pytorch_model.pth', 'model.pth')
_READ_ERRORS = (SafetensorError, OSError, EOFError, RuntimeError, ValueError)


def _without_hub(variant: str) -> str:
    """How to get the weights of ``variant`` without the Hub: the download command and the line that loads them."""
    return (f'Get the official weights without the Hub: `timm-san download {variant}` (pip install '
            f'"timm-san[download]") converts them into a folder and prints the line that loads it, '
            f'timm.create_model("local-dir:FOLDER", pretrained=True).')


def _cache_dir(cache_dir: Optional[Any]) -> str:
    return str(cache_dir) if cache_dir else hf_constants.HF_HUB_CACHE


def _not_published_note(variant: str, hub_id: str, error: Exception) -> str:
    if isinstance(error, GatedRepoError):
        answer = 'it is gated and this token has no access'
    elif isinstance(error, RevisionNotFoundError):
        answer = f'the repository has no revision {hub_id.partition("@")[2] or "main"}'
    else:
        answer = 'it has no such repository, or none this token may see'
    return (f'{NOTE_PREFIX}the pretrained weights of {variant} are not published at {hf_constants.ENDPOINT}: '
            f'asked for {hub_id}, the Hub answered that {answer}. {_without_hub(variant)} Another copy on a Hub: '
            f'HF_ENDPOINT (a mirror) or TIMM_SAN_HF_HUB_ORG (another organisation).')


def _unreachable_note(variant: str, hub_id: str, cache_dir: Optional[Any], detail: str) -> str:
    return (f'{NOTE_PREFIX}the pretrained weights of {variant} ({hub_id}) are not in the cache '
            f'{_cache_dir(cache_dir)}, and {hf_constants.ENDPOINT} could not be reached ({detail}); asked once, '
            f'without retries. {_without_hub(variant)}')


def _offline_note(variant: str, hub_id: str, cache_dir: Optional[Any]) -> str:
    return (f'{NOTE_PREFIX}offline mode (HF_HUB_OFFLINE) is on and the cache {_cache_dir(cache_dir)} holds no '
            f'weights of {variant} ({hub_id}). {_without_hub(variant)}')


def _missing_file_note(variant: str, hub_id: str) -> str:
    return (f'{NOTE_PREFIX}{hub_id} on {hf_constants.ENDPOINT} holds no weights file for {variant} (timm tries '
            f'{_WEIGHTS_FILE}, then pytorch_model.bin). {_without_hub(variant)}')


def _add_note(error: BaseException, note: str) -> None:
    if note not in getattr(error, '__notes__', ()):
        error.add_note(note)


def _fail_fast(variant: str, hub_id: str, filename: str, cache_dir: Optional[Any]) -> None:
    """One HEAD request for ``filename`` of ``hub_id``, without retries, when the cache does not hold it.

    Raises:
        RepositoryNotFoundError: (or GatedRepoError, RevisionNotFoundError) with a note: not published there.
        LocalEntryNotFoundError: The endpoint could not be reached; with a note.
        HfHubHTTPError: The endpoint answered with another error; with a note.
    """
    if hf_constants.HF_HUB_OFFLINE:
        return  # huggingface_hub answers from the cache alone, at once; the error gets its note after
    repo_id, _, revision = hub_id.partition('@')
    if isinstance(try_to_load_from_cache(repo_id, filename, cache_dir=cache_dir, revision=revision or None), str):
        return  # cached: huggingface_hub uses the copy when the Hub cannot be reached
    try:
        get_hf_file_metadata(hf_hub_url(repo_id, filename, revision=revision or None),
                             timeout=hf_constants.HF_HUB_ETAG_TIMEOUT)
    except (RepositoryNotFoundError, RevisionNotFoundError) as e:
        _add_note(e, _not_published_note(variant, hub_id, e))
        raise
    except EntryNotFoundError:
        return  # the repository is there; timm tries its other file names and says which it missed
    except HfHubHTTPError as e:
        _add_note(e, f'{NOTE_PREFIX}{hf_constants.ENDPOINT} answered an error for {hub_id} ({e.response.status_code}); '
                     f'asked once, without retries. {_without_hub(variant)}')
        raise
    except Exception as e:  # noqa: BLE001  anything else (DNS, refused, timeout, TLS, proxy) means not reachable
        error = LocalEntryNotFoundError(
            f'Cannot fetch {filename} of {hub_id}: {hf_constants.ENDPOINT} could not be reached '
            f'({type(e).__name__}: {e}) and the cache {_cache_dir(cache_dir)} does not hold it.')
        _add_note(error, _unreachable_note(variant, hub_id, cache_dir, type(e).__name__))
        raise error from e


def _damaged_download_advice(hub_id: str, revision: Optional[str], cache_dir: Optional[Any]) -> str:
    """What to say about a cached download that is not valid safetensors: damaged in transfer, or on the Hub."""
    cached = try_to_load_from_cache(hub_id, _WEIGHTS_FILE, cache_dir=cache_dir, revision=revision)
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
            f'{hf_constants.ENDPOINT} is itself damaged: publish it again (timm-san publish), or point at a mirror '
            f'(HF_ENDPOINT) or a converted folder (local-dir:). Then delete {repo_cache} and load again.')


def _local_dir_file(folder: str) -> str:
    """The file timm's local-dir loader reads from ``folder``: the first of its preferred names that exists."""
    for name in _LOCAL_DIR_FILES:
        if os.path.isfile(os.path.join(folder, name)):
            return os.path.join(folder, name)
    return os.path.join(folder, _WEIGHTS_FILE)


def _pretrained_source(variant: str, kwargs: Dict[str, Any]) -> Tuple[str, Any]:
    """Where timm will load the pretrained weights from, as timm itself resolves it: (kind, location)."""
    # deferred: timm.models imports the model modules, this one among them
    from timm.models import resolve_pretrained_cfg
    from timm.models._builder import _resolve_pretrained_source
    cfg = resolve_pretrained_cfg(variant, kwargs.get('pretrained_cfg'), kwargs.get('pretrained_cfg_overlay'))
    return _resolve_pretrained_source(cfg.to_dict())


@contextmanager
def explain_pretrained_errors(variant: str, pretrained: bool, kwargs: Dict[str, Any]) -> Iterator[None]:
    """Make building a SAN with pretrained weights fail fast and say where it looked and what to do.

    Args:
        variant: Architecture being created.
        pretrained: Whether pretrained weights are loaded (nothing is checked otherwise).
        kwargs: The keyword arguments of the model factory (``pretrained_cfg``, ``pretrained_cfg_overlay``,
            ``cache_dir`` are read).

    Raises:
        CheckpointReadError: The weights file is missing, empty, truncated, corrupt or not a checkpoint.
        RepositoryNotFoundError, LocalEntryNotFoundError, EntryNotFoundError: From huggingface_hub, with a note.
    """
    if not pretrained:
        yield
        return
    load_from, location = _pretrained_source(variant, kwargs)
    cache_dir = kwargs.get('cache_dir')
    hub_id = None
    if load_from == 'hf-hub':
        # a tuple when the cfg names a file (hf_hub_filename); timm then reads that file alone
        hub_id, filename = (location, _WEIGHTS_FILE) if isinstance(location, str) else location
        _fail_fast(variant, hub_id, filename, cache_dir)
    try:
        yield
    except (CheckpointMismatchError, CheckpointReadError):
        raise
    except (RepositoryNotFoundError, RevisionNotFoundError) as e:
        _add_note(e, _not_published_note(variant, hub_id or '?', e))
        raise
    except LocalEntryNotFoundError as e:
        if hf_constants.HF_HUB_OFFLINE:
            _add_note(e, _offline_note(variant, hub_id or '?', cache_dir))
        else:
            _add_note(e, _unreachable_note(variant, hub_id or '?', cache_dir, 'see above'))
        raise
    except EntryNotFoundError as e:
        _add_note(e, _missing_file_note(variant, hub_id or '?'))
        raise
    except _READ_ERRORS as e:
        if load_from == 'hf-hub' and isinstance(e, SafetensorError):
            repo_id, _, revision = hub_id.partition('@')
            raise CheckpointReadError(
                f'The pretrained weights of {variant} ({_WEIGHTS_FILE} of {repo_id}) are not a valid safetensors '
                f'file: it is truncated or corrupt ({e}). '
                f'{_damaged_download_advice(repo_id, revision or None, cache_dir)}') from e
        if load_from not in ('file', 'local-dir'):
            raise
        path = location if load_from == 'file' else _local_dir_file(location)
        if checkpoint_file_problem(path, e) is None:
            raise  # nothing wrong with the file: the error is another one, and keeps its own words
        advice = ('Write the folder again (timm-san download --force, or timm-san convert).' if load_from == 'local-dir'
                  else 'Check the path, or download the file again.')
        raise CheckpointReadError(
            f'{describe_unreadable(path, e, what=f"pretrained weights of {variant}")} {advice}') from e


def pretrained_error_summary(error: BaseException) -> Optional[str]:
    """The short account timm-san gives of a failed pretrained load: its note, or its own error's message.

    Args:
        error: An error raised while creating a SAN with pretrained weights.

    Returns:
        One paragraph, or None when the error is none of those this module explains.
    """
    if isinstance(error, (CheckpointReadError, CheckpointMismatchError)):
        return str(error)
    notes = [note[len(NOTE_PREFIX):] for note in getattr(error, '__notes__', ()) if note.startswith(NOTE_PREFIX)]
    if notes:
        return notes[-1]
    return None


def _is_san_repository(repo_id: str) -> bool:
    """Whether a Hub repository id names SAN weights: ``<org>/<san architecture>.<tag>``."""
    return repo_id.rpartition('/')[2].partition('.')[0] in PAPER_RESULTS


def _wrap_hf_config_loader() -> None:
    """Give ``hf-hub:`` names of SAN repositories the fast check and the notes of ``explain_pretrained_errors``.

    timm loads the repository's config.json in ``create_model`` before the model's own factory runs, through the
    name ``load_model_config_from_hf`` of ``timm.models._factory``; that name is wrapped, once. Other repositories
    go to timm's loader untouched.
    """
    from timm.models import _factory
    original = _factory.load_model_config_from_hf
    if getattr(original, '_timm_san_wrapped', False):
        return

    @functools.wraps(original)
    def load_model_config_from_hf(model_id: str, *args, **kwargs):
        repo_id = model_id.partition('@')[0]
        if not _is_san_repository(repo_id):
            return original(model_id, *args, **kwargs)
        variant = repo_id.rpartition('/')[2].partition('.')[0]
        cache_dir = kwargs.get('cache_dir')
        _fail_fast(variant, model_id, _CONFIG_FILE, cache_dir)
        try:
            return original(model_id, *args, **kwargs)
        except (RepositoryNotFoundError, RevisionNotFoundError) as e:
            _add_note(e, _not_published_note(variant, model_id, e))
            raise
        except LocalEntryNotFoundError as e:
            note = (_offline_note(variant, model_id, cache_dir) if hf_constants.HF_HUB_OFFLINE
                    else _unreachable_note(variant, model_id, cache_dir, 'see above'))
            _add_note(e, note)
            raise
        except EntryNotFoundError as e:
            _add_note(e, f'{NOTE_PREFIX}{repo_id} on {hf_constants.ENDPOINT} has no {_CONFIG_FILE}, which hf-hub: '
                         f'names need. {_without_hub(variant)}')
            raise

    load_model_config_from_hf._timm_san_wrapped = True
    _factory.load_model_config_from_hf = load_model_config_from_hf


_wrap_hf_config_loader()
