""" The official SAN checkpoints from the release's Google Drive, checked and converted into a cache folder

Each checkpoint is fetched by its Drive file id (``official_checkpoints.json``) with gdown, checked (sha256 where one
is recorded; the misfit check against the model), converted as ``timm-san convert`` converts (safetensors weights,
timm's config.json, a model card) and loaded back through timm before the folder is renamed into place, so the
cache holds whole folders or nothing:

    <cache>/san10_pairwise.orig_in1k/{model.safetensors, config.json, README.md, timm_san_source.json}

which ``timm.create_model('local-dir:<cache>/san10_pairwise.orig_in1k', pretrained=True)`` loads. The cache is
``$TIMM_SAN_CACHE`` if set, else ``timm-san`` under huggingface_hub's ``HF_HOME`` (``~/.cache/huggingface``).
``$TIMM_SAN_DRIVE_URL`` replaces the download address (a template with ``{id}``), for a mirror or a test server.
"""
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Optional, Union

from huggingface_hub import constants as hf_constants

from ..version import __version__ as timm_san_version
from .checkpoint import checkpoint_file_problem
from .hub_ids import hf_hub_id
from .sources import OfficialSource, Sha256MismatchError, check_sha256, file_sha256

__all__ = [
    'DownloadError', 'Fetched', 'TAG', 'SOURCE_FILE', 'default_cache_dir', 'drive_url', 'folder_for',
    'fetch_official', 'load_instructions',
]

TAG = 'orig_in1k'
SOURCE_FILE = 'timm_san_source.json'  # what the folder was made from; timm's local-dir loader ignores it
CACHE_ENV = 'TIMM_SAN_CACHE'
DRIVE_URL_ENV = 'TIMM_SAN_DRIVE_URL'
DEFAULT_DRIVE_URL = 'https://drive.google.com/uc?id={id}'
DOWNLOAD_TIMEOUT_S = 60  # longest wait for the next bytes; gdown itself waits forever
CHECK_INPUT_SIZE = 64  # the converted folder's outputs are compared with the checkpoint's on images this size


class DownloadError(RuntimeError):
    """An official checkpoint that could not be fetched, checked or converted; nothing was left in the cache."""


@dataclass
class Fetched:
    """A converted folder in the cache, and how it got there."""
    model_name: str
    folder: Path
    downloaded: bool
    sha256: Optional[str]
    report: str


def default_cache_dir() -> Path:
    """``$TIMM_SAN_CACHE``, else ``<HF_HOME>/timm-san``."""
    return Path(os.environ.get(CACHE_ENV) or os.path.join(hf_constants.HF_HOME, 'timm-san')).expanduser()


def drive_url(file_id: str) -> str:
    """Where a Drive file is downloaded from: ``$TIMM_SAN_DRIVE_URL`` (with ``{id}``), else Google Drive."""
    return (os.environ.get(DRIVE_URL_ENV) or DEFAULT_DRIVE_URL).format(id=file_id)


def folder_for(model_name: str, cache_dir: Union[str, Path, None] = None) -> Path:
    """The cache folder of a model's converted official weights."""
    return Path(cache_dir or default_cache_dir()).expanduser().absolute() / f'{model_name}.{TAG}'


def _cached_folder_problem(folder: Path) -> Optional[str]:
    """What is wrong with a folder in the cache, or None when timm can load it (weights header not damaged)."""
    if not (folder / 'config.json').is_file():
        return 'it has no config.json'
    return checkpoint_file_problem(str(folder / 'model.safetensors'))


def _recorded_sha256(folder: Path) -> Optional[str]:
    try:
        return json.loads((folder / SOURCE_FILE).read_text(encoding='utf-8')).get('sha256')
    except (OSError, ValueError, AttributeError):
        return None


def _gdown_download(url: str, output: Path, quiet: bool) -> None:
    """Download ``url`` to ``output`` with gdown (its progress bar on stderr), once, without retries."""
    try:
        import gdown
        import requests
    except ImportError as e:
        raise DownloadError(
            f'timm-san download needs gdown ({e}): pip install "timm-san[download]" (or pip install gdown).') from e
    try:
        gdown.download(url=url, output=str(output), quiet=quiet, timeout=DOWNLOAD_TIMEOUT_S)
    except (gdown.exceptions.DownloadError, requests.RequestException, OSError) as e:
        detail = ' '.join(str(e).split()) or type(e).__name__
        raise DownloadError(f'the download from {url} failed: {detail}') from e


def fetch_official(
        source: OfficialSource,
        cache_dir: Union[str, Path, None] = None,
        force: bool = False,
        quiet: bool = False,
        check_input_size: int = CHECK_INPUT_SIZE,
        log: Callable[[str], None] = print,
) -> Fetched:
    """The cache folder of a model's official weights: found there, or downloaded, checked and converted into it.

    Args:
        source: The record of the model's official checkpoint.
        cache_dir: Cache folder (default: ``default_cache_dir()``).
        force: Download and convert again even when the folder is there, then replace it.
        quiet: No progress bar.
        check_input_size: Side of the random images the converted folder is checked on.
        log: Where progress lines go.

    Returns:
        The folder and how it got there.

    Raises:
        DownloadError: The download failed, the file is not the official checkpoint (sha256), cannot be read or
            does not fit the model, or the folder in the cache is damaged; the cache is left as it was.
    """
    from .conversion import ConversionError, write_hub_folder  # deferred: loads the models

    name = source.model_name
    folder = folder_for(name, cache_dir)
    if folder.exists() and not force:
        problem = _cached_folder_problem(folder)
        if problem is not None:
            raise DownloadError(f'{folder} is in the cache but {problem}: download it again with --force.')
        sha256 = _recorded_sha256(folder)
        if source.sha256 and sha256 and sha256 != source.sha256:
            raise DownloadError(
                f'{folder} was converted from a file with sha256 {sha256}, but the official {name} checkpoint is '
                f'recorded with {source.sha256}: download it again with --force.')
        return Fetched(name, folder, False, sha256, f'{name}: found {folder}, nothing downloaded.')
    if not source.drive_file_id:
        raise DownloadError(f'No Google Drive file id is recorded for {name}; it cannot be downloaded.')

    url = drive_url(source.drive_file_id)
    folder.parent.mkdir(parents=True, exist_ok=True)
    # the download lands beside the cache folder and goes with it, whatever happens
    work = Path(tempfile.mkdtemp(prefix=f'.{folder.name}.download-', dir=folder.parent))
    try:
        checkpoint = work / f'{name}.pth'
        log(f'{name}: downloading the official checkpoint ({source.official_path}) from {url}')
        _gdown_download(url, checkpoint, quiet)
        sha256 = file_sha256(checkpoint)
        try:
            report = check_sha256(source, sha256, f'{name} ({url})')
        except Sha256MismatchError as e:
            raise DownloadError(str(e).replace(' To convert it anyway, pass --ignore-sha256.', '')) from e
        log(report)
        provenance = {'model': name, 'drive_file_id': source.drive_file_id, 'url': url, 'sha256': sha256,
                      'official_path': source.official_path, 'converted_by': f'timm-san {timm_san_version}'}
        try:
            write_hub_folder(
                checkpoint, name, folder, hf_hub_id(f'{name}.{TAG}'), source, sha256, overwrite=force,
                check_input_size=check_input_size, converter='timm-san download',
                extra_files={SOURCE_FILE: json.dumps(provenance, indent=2) + '\n'})
        except ConversionError as e:
            raise DownloadError(f'The file downloaded from {url} for {name} was not converted: {e}') from e
    except DownloadError as e:
        raise DownloadError(f'{name}: {e} Nothing was written to {folder.parent}.') from e
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return Fetched(name, folder, True, sha256, f'{name}: downloaded, checked and converted into {folder}.')


def load_instructions(model_name: str, folder: Path) -> Dict[str, str]:
    """The lines that load a converted folder: in Python, and as arguments of timm's validate.py and train.py.

    ``--pretrained-path`` is how train.py takes a weights file (it becomes ``pretrained_cfg_overlay=dict(file=)``
    with a head that adapts to ``--num-classes``); validate.py takes the folder as a model name.
    """
    return {
        'python': f"timm.create_model('local-dir:{folder}', pretrained=True)",
        'validate.py': f'--model local-dir:{folder} --pretrained',
        'train.py': f'--model {model_name} --pretrained --pretrained-path {folder / "model.safetensors"}',
    }
