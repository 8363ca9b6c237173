""" Writing an official SAN checkpoint out as a Hub-ready folder, and checking the folder before it is moved into place

Used by ``timm-san convert`` once its cheap checks (arguments, sha256) have passed, and by ``timm-san download``.
"""
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional

import timm
import torch
from timm.models._hub import save_for_hf

from ..version import __version__ as timm_san_version
from .checkpoint import CheckpointMismatchError, CheckpointReadError, check_state_dict, load_official_checkpoint
from .model_card import model_card_text
from .sources import OfficialSource

__all__ = ['ConversionError', 'WRITTEN_FILES', 'write_hub_folder', 'replace_folder']

WRITTEN_FILES = ('model.safetensors', 'config.json', 'README.md')


class ConversionError(RuntimeError):
    """A conversion that cannot go on; the message says why and what to do."""


def _differing_tensors(expected: Dict[str, torch.Tensor], got: Dict[str, torch.Tensor]) -> List[str]:
    """Names of the tensors that are missing, extra or not bit-identical."""
    differ = sorted(set(expected) ^ set(got))
    differ += [k for k in expected if k in got and (
        expected[k].dtype != got[k].dtype or not torch.equal(expected[k], got[k]))]
    return differ


def _check_written(folder: Path, model: torch.nn.Module, state_dict: Dict[str, torch.Tensor], input_size: int) -> None:
    """Load ``folder`` back through timm and compare its weights and outputs with the checkpoint's."""
    reloaded = timm.create_model(f'local-dir:{folder}', pretrained=True).eval()
    differ = _differing_tensors(state_dict, reloaded.state_dict())
    if differ:
        raise ConversionError(
            f'The written folder does not load back to the checkpoint\'s weights ({len(differ)} tensors differ, '
            f'e.g. {differ[:3]}). Nothing was written; report this as a bug.')
    images = torch.randn(2, 3, input_size, input_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got = model(images), reloaded(images)
    if not torch.equal(expected, got):
        raise ConversionError(
            f'The written folder loads but its outputs differ from the checkpoint\'s (max abs difference '
            f'{(expected - got).abs().max().item():.3g}). Nothing was written; report this as a bug.')


def _open_permissions(folder: Path) -> None:
    """Give the folder and its files the permissions the umask allows (mkdtemp and safetensors make them private)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    for path in folder.iterdir():
        os.chmod(path, 0o666 & ~umask)


def replace_folder(tmp_dir: Path, out_dir: Path, overwrite: bool) -> None:
    """Rename a folder written beside ``out_dir`` into its place; an existing one is replaced only if told to.

    Raises:
        ConversionError: ``out_dir`` exists and ``overwrite`` is False.
    """
    if out_dir.exists():
        if not overwrite:
            raise ConversionError(f'{out_dir} appeared while converting; nothing was replaced.')
        # move the old folder aside first, so a failed rename never leaves neither
        old_dir = Path(tempfile.mkdtemp(prefix=f'.{out_dir.name}.old-', dir=out_dir.parent))
        os.replace(out_dir, old_dir / out_dir.name)
        os.replace(tmp_dir, out_dir)
        shutil.rmtree(old_dir)
    else:
        os.replace(tmp_dir, out_dir)


def write_hub_folder(
        checkpoint: Path,
        model_name: str,
        out_dir: Path,
        repo_id: str,
        source: OfficialSource,
        sha256: str,
        overwrite: bool = False,
        check_input_size: int = 224,
        converter: str = 'timm-san convert',
        extra_files: Optional[Dict[str, str]] = None,
) -> Dict[str, Any]:
    """Convert ``checkpoint`` into ``out_dir``: safetensors weights, timm's config.json, the model card.

    The folder is written beside ``out_dir`` under a temporary name, loaded back through timm (``local-dir:``)
    and compared with the checkpoint, weights and outputs, and only then renamed into place.

    Args:
        checkpoint: Official checkpoint file.
        model_name: Architecture it holds.
        out_dir: Folder to write.
        repo_id: Hub repository the model card names.
        source: Record of the official checkpoint.
        sha256: The file's sha256, for the model card.
        overwrite: Replace an existing ``out_dir``.
        check_input_size: Side of the random images the outputs are compared on.
        converter: What converted it, for the model card.
        extra_files: Further text files to write into the folder, by name.

    Returns:
        Sizes of the files written, by name.

    Raises:
        ConversionError: The checkpoint cannot be read or does not fit the model, or the folder does not load
            back to it; nothing is left at ``out_dir`` (or beside it).
    """
    try:
        state_dict, extra = load_official_checkpoint(str(checkpoint))
        model = timm.create_model(model_name, pretrained=False).eval()
        check_state_dict(model, state_dict, model_name=model_name)
    except (CheckpointReadError, CheckpointMismatchError) as e:
        raise ConversionError(str(e)) from e
    model.load_state_dict(state_dict)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # written beside its destination, then renamed: the folder appears whole or not at all
    tmp_dir = Path(tempfile.mkdtemp(prefix=f'.{out_dir.name}.tmp-', dir=out_dir.parent))
    try:
        save_for_hf(model, str(tmp_dir), safe_serialization=True)
        card = model_card_text(
            model_name, repo_id, source, checkpoint.name, sha256,
            num_params=sum(p.numel() for p in model.parameters()), checkpoint_extra=extra,
            converter=f'timm-san {timm_san_version} ({converter})')
        (tmp_dir / 'README.md').write_text(card, encoding='utf-8')
        for name, text in (extra_files or {}).items():
            (tmp_dir / name).write_text(text, encoding='utf-8')
        _check_written(tmp_dir, model, state_dict, check_input_size)
        _open_permissions(tmp_dir)
        replace_folder(tmp_dir, out_dir, overwrite)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return {name: (out_dir / name).stat().st_size for name in WRITTEN_FILES}
