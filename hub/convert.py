#!/usr/bin/env python3
""" Turn an official SAN checkpoint into a folder ready to upload to the Hugging Face Hub

    python hub/convert.py model_best.pth --model san10_pairwise --out hub-out/san10_pairwise.orig_in1k

The folder holds ``model.safetensors`` and ``config.json`` as timm writes them (``timm.create_model('local-dir:DIR',
pretrained=True)`` loads it) and a ``README.md`` model card. The checkpoint is read with ``weights_only=True``,
checked against the recorded sha256 and against the model, and the written folder is loaded back and its outputs
compared with the checkpoint's before it is moved into place; on any failure nothing is left at DIR.
"""
import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Optional

import torch
import timm
from timm.models._hub import save_for_hf

import timm_san  # noqa: F401  registers the SAN models
from timm_san.checkpoint import (
    CheckpointMismatchError, CheckpointReadError, check_state_dict, load_official_checkpoint)
from timm_san.hub_ids import hf_hub_id
from timm_san.version import __version__ as timm_san_version

from model_card import model_card_text
from official_sources import (
    DEFAULT_SOURCES_FILE, Sha256MismatchError, SourceRecordError, check_sha256, file_sha256, load_sources)

TAG = 'orig_in1k'
WRITTEN_FILES = ('model.safetensors', 'config.json', 'README.md')


class ConversionError(RuntimeError):
    """A conversion that cannot go on; the message says why and what to do."""


def _parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description='Convert an official SAN checkpoint (.pth from the Google Drive release) into a Hub-ready folder.')
    parser.add_argument('checkpoint', help='official checkpoint file, e.g. model_best.pth')
    parser.add_argument('--model', required=True, help='SAN architecture it holds, e.g. san10_pairwise')
    parser.add_argument('--out', required=True, help='folder to write (must not exist unless --overwrite)')
    parser.add_argument('--repo-id', default=None,
                        help=f'Hub repository the card names (default {hf_hub_id("<model>." + TAG)})')
    parser.add_argument('--sources', default=str(DEFAULT_SOURCES_FILE),
                        help='record of the official checkpoints and their sha256 (default: %(default)s)')
    parser.add_argument('--ignore-sha256', action='store_true',
                        help='convert even when the file differs from the recorded sha256')
    parser.add_argument('--overwrite', action='store_true', help='replace an existing --out folder')
    parser.add_argument('--check-input-size', type=int, default=224,
                        help='side of the random images the written folder is checked on (default: %(default)s)')
    return parser.parse_args(argv)


def _same_tensors(expected: Dict[str, torch.Tensor], got: Dict[str, torch.Tensor]) -> List[str]:
    """Names of the tensors that are missing, extra or not bit-identical."""
    differ = sorted(set(expected) ^ set(got))
    differ += [k for k in expected if k in got and (
        expected[k].dtype != got[k].dtype or not torch.equal(expected[k], got[k]))]
    return differ


def _check_written(folder: Path, model: torch.nn.Module, state_dict: Dict[str, torch.Tensor], input_size: int) -> None:
    """Load ``folder`` back through timm and compare its weights and outputs with the checkpoint's."""
    reloaded = timm.create_model(f'local-dir:{folder}', pretrained=True).eval()
    differ = _same_tensors(state_dict, reloaded.state_dict())
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


def _move_into_place(tmp_dir: Path, out_dir: Path, overwrite: bool) -> None:
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


def convert(args: argparse.Namespace) -> Dict[str, str]:
    """Convert ``args.checkpoint`` into ``args.out``; see the module docstring.

    Returns:
        What was done, to report: the sha256 check and the files written.

    Raises:
        ConversionError: With a message that says what was wrong and what to do.
    """
    model_name = args.model
    sources = load_sources(args.sources)
    if model_name not in sources:
        raise ConversionError(
            f'Unknown model {model_name!r}: the official checkpoints are of {", ".join(sorted(sources))}.')
    if args.check_input_size < 32:
        raise ConversionError(f'--check-input-size must be at least 32 (five 2x2 pools), got {args.check_input_size}.')
    source = sources[model_name]
    checkpoint = Path(args.checkpoint)
    out_dir = Path(args.out).absolute()
    if out_dir.exists() and not args.overwrite:
        raise ConversionError(f'{out_dir} already exists; choose another --out or pass --overwrite to replace it.')
    if not checkpoint.is_file():
        raise ConversionError(f'No checkpoint file at {str(checkpoint)!r}.')

    sha256 = file_sha256(checkpoint)
    try:
        sha256_report = check_sha256(source, sha256, checkpoint.name)
    except Sha256MismatchError as e:
        if not args.ignore_sha256:
            raise ConversionError(str(e)) from e
        sha256_report = f'{e} Converting anyway (--ignore-sha256).'
    print(sha256_report, flush=True)

    try:
        state_dict, extra = load_official_checkpoint(str(checkpoint))
        model = timm.create_model(model_name, pretrained=False).eval()
        check_state_dict(model, state_dict, model_name=model_name)
    except (CheckpointReadError, CheckpointMismatchError) as e:
        raise ConversionError(str(e)) from e
    model.load_state_dict(state_dict)

    repo_id = args.repo_id or hf_hub_id(f'{model_name}.{TAG}')
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # written beside its destination, then renamed: DIR either appears whole or not at all
    tmp_dir = Path(tempfile.mkdtemp(prefix=f'.{out_dir.name}.tmp-', dir=out_dir.parent))
    try:
        save_for_hf(model, str(tmp_dir), safe_serialization=True)
        card = model_card_text(
            model_name, repo_id, source, checkpoint.name, sha256,
            num_params=sum(p.numel() for p in model.parameters()), checkpoint_extra=extra,
            converter=f'timm-san {timm_san_version} hub/convert.py')
        (tmp_dir / 'README.md').write_text(card, encoding='utf-8')
        _check_written(tmp_dir, model, state_dict, args.check_input_size)
        _open_permissions(tmp_dir)
        _move_into_place(tmp_dir, out_dir, args.overwrite)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return {
        'sha256': sha256_report,
        'out': str(out_dir),
        'files': ', '.join(f'{name} ({(out_dir / name).stat().st_size} bytes)' for name in WRITTEN_FILES),
        'repo_id': repo_id,
    }


def main(argv: Optional[List[str]] = None) -> int:
    args = _parse_args(argv)
    try:
        report = convert(args)
    except (ConversionError, SourceRecordError) as e:
        print(f'convert.py: error: {e}', file=sys.stderr)
        return 1
    print(f'Wrote {report["out"]}: {report["files"]}.')
    print(f'Checked: the folder loads back through timm (local-dir:) with the checkpoint\'s weights and outputs.')
    print(f'Publish it with: python hub/publish.py {report["out"]} --repo-id {report["repo_id"]}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
