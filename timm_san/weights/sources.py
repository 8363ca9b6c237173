""" Where each official SAN checkpoint comes from, and the check of a downloaded file against that record

The record is ``official_checkpoints.json`` beside this file: the release folder, the path the official test
config reads each checkpoint from, and, where known, the Google Drive file id and the file's sha256.
"""
import json
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Union

from huggingface_hub.utils.sha import sha_fileobj

__all__ = [
    'DEFAULT_SOURCES_FILE', 'OfficialSource', 'SourceRecordError', 'Sha256MismatchError', 'load_sources',
    'file_sha256', 'check_sha256', 'record_sha256',
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
            f'(see {DEFAULT_SOURCES_FILE} for the layout). Detail: {e!r}') from e
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
                f'(its sha256 is {sha256}; the first `timm-san publish` records it in {DEFAULT_SOURCES_FILE.name}).')
    if sha256 != source.sha256:
        raise Sha256MismatchError(
            f'{file_name} has sha256 {sha256}, but the official {source.model_name} checkpoint is recorded with '
            f'{source.sha256}. The file is not the official one, or is damaged: download it again from '
            f'{source.url}. To convert it anyway, pass --ignore-sha256.')
    return f'{file_name}: sha256 {sha256} matches the record of the official {source.model_name} checkpoint.'


def record_sha256(model_name: str, sha256: str, path: Union[str, Path] = DEFAULT_SOURCES_FILE) -> bool:
    """Record the sha256 of a model's official checkpoint where none is recorded yet.

    The file is rewritten whole beside itself and renamed into place (a link to it is followed, not replaced).

    Args:
        model_name: The model.
        sha256: Hex sha256 of its checkpoint.
        path: The record.

    Returns:
        Whether the record changed (False when this sha256 was already recorded).

    Raises:
        SourceRecordError: The record is malformed, has no entry for the model, or holds another sha256 for it.
    """
    path = Path(path).resolve()
    load_sources(path)  # the same checks as every reader
    record = json.loads(path.read_text(encoding='utf-8'))
    entry = record['checkpoints'].get(model_name)
    if entry is None:
        raise SourceRecordError(f'{str(path)!r} has no entry for {model_name}.')
    if entry.get('sha256') == sha256:
        return False
    if entry.get('sha256') is not None:
        raise SourceRecordError(
            f'{str(path)!r} already records sha256 {entry["sha256"]} for {model_name}, not {sha256}; '
            f'a recorded sha256 is changed by hand only.')
    entry['sha256'] = sha256
    fd, tmp = tempfile.mkstemp(prefix=f'.{path.name}.', dir=path.parent)
    try:
        with os.fdopen(fd, 'w', encoding='utf-8') as f:
            f.write(_dump_record(record))
        os.chmod(tmp, path.stat().st_mode & 0o777)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return True


def _dump_record(record: Dict) -> str:
    """The record as the file lays it out: one line per checkpoint, so a diff shows which one changed."""
    lines = ['{']
    top = [(k, v) for k, v in record.items() if k != 'checkpoints']
    lines += [f'  {json.dumps(k)}: {json.dumps(v)},' for k, v in top]
    lines.append('  "checkpoints": {')
    entries = list(record['checkpoints'].items())
    for i, (name, entry) in enumerate(entries):
        lines.append(f'    {json.dumps(name)}: {json.dumps(entry)}' + (',' if i < len(entries) - 1 else ''))
    lines += ['  }', '}', '']
    return '\n'.join(lines)
