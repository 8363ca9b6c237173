""" Where each official SAN checkpoint comes from, and the check of a downloaded file against that record

The record is ``official_checkpoints.json`` beside this file: the release folder, the path the official test
config reads each checkpoint from, and, where known, the Google Drive file id and the file's sha256.
"""
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Union

from huggingface_hub.utils.sha import sha_fileobj

__all__ = [
    'DEFAULT_SOURCES_FILE', 'OfficialSource', 'SourceRecordError', 'Sha256MismatchError', 'load_sources',
    'file_sha256', 'check_sha256',
]

DEFAULT_SOURCES_FILE = Path(__file__).with_name('official_checkpoints.json')
_SHA256 = re.compile(r'^[0-9a-f]{64}$')


class SourceRecordError(ValueError):
    """The record of official checkpoints is missing, malformed, or has no entry for a model."""


class Sha256MismatchError(ValueError):
    """A checkpoint file whose sha256 differs from the one recorded for it."""


@dataclass(frozen=True)
class OfficialSource:
    """Where one official checkpoint comes from."""
    model_name: str
    release_folder: str
    official_path: str
    drive_file_id: Optional[str] = None
    sha256: Optional[str] = None

    @property
    def url(self) -> str:
        """The file's own download page when its id is recorded, else the release folder."""
        if self.drive_file_id:
            return f'https://drive.google.com/file/d/{self.drive_file_id}/view'
        return self.release_folder


def load_sources(path: Union[str, Path] = DEFAULT_SOURCES_FILE) -> Dict[str, OfficialSource]:
    """Read the record of official checkpoints.

    Args:
        path: JSON file laid out as ``official_checkpoints.json``.

    Returns:
        The record of each model, by model name.

    Raises:
        SourceRecordError: The file is missing or malformed, or holds a sha256 that is not 64 hex digits.
    """
    path = Path(path)
    try:
        record = json.loads(path.read_text(encoding='utf-8'))
        folder = record['release_folder']
        entries = record['checkpoints']
    except FileNotFoundError as e:
        raise SourceRecordError(f'No record of official checkpoints at {str(path)!r}.') from e
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise SourceRecordError(
            f'{str(path)!r} is not a record of official checkpoints: it needs "release_folder" and "checkpoints" '
            f'(see {DEFAULT_SOURCES_FILE.name} in hub/). Detail: {e!r}') from e
    sources = {}
    for name, entry in entries.items():
        sha256 = entry.get('sha256')
        if sha256 is not None and not _SHA256.match(str(sha256).lower()):
            raise SourceRecordError(
                f'{str(path)!r}: the sha256 recorded for {name} ({sha256!r}) is not 64 hex digits; fix it or set it '
                f'to null.')
        sources[name] = OfficialSource(
            model_name=name,
            release_folder=entry.get('release_folder', folder),
            official_path=entry.get('official_path', ''),
            drive_file_id=entry.get('drive_file_id'),
            sha256=sha256.lower() if sha256 else None,
        )
    return sources


def file_sha256(path: Union[str, Path]) -> str:
    """Hex sha256 of a file, read in chunks."""
    with open(path, 'rb') as f:
        return sha_fileobj(f).hex()


def check_sha256(source: OfficialSource, sha256: str, file_name: str) -> str:
    """Check a file's sha256 against the one recorded for its model.

    Args:
        source: The record of the model's official checkpoint.
        sha256: Hex sha256 of the file given.
        file_name: The file's name, for the messages.

    Returns:
        What the check found, to report: a match, or that no sha256 is recorded to check against.

    Raises:
        Sha256MismatchError: A sha256 is recorded and the file's differs.
    """
    if source.sha256 is None:
        return (f'{file_name}: no recorded sha256 to check against for {source.model_name} '
                f'(its sha256 is {sha256}; record it in {DEFAULT_SOURCES_FILE.name} once the file is confirmed).')
    if sha256 != source.sha256:
        raise Sha256MismatchError(
            f'{file_name} has sha256 {sha256}, but the official {source.model_name} checkpoint is recorded with '
            f'{source.sha256}. The file is not the official one, or is damaged: download it again from '
            f'{source.url}. To convert it anyway, pass --ignore-sha256.')
    return f'{file_name}: sha256 {sha256} matches the record of the official {source.model_name} checkpoint.'
