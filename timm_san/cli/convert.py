""" ``timm-san convert CHECKPOINT --model NAME --out DIR``: an official SAN checkpoint -> a folder timm loads

The folder holds ``model.safetensors`` and ``config.json`` as timm writes them (``timm.create_model('local-dir:DIR',
pretrained=True)`` loads it) and a ``README.md`` model card. The checkpoint is read with ``weights_only=True``,
checked against the recorded sha256 and against the model, and the written folder is loaded back and its outputs
compared with the checkpoint's before it is moved into place; on any failure nothing is left at DIR.
``hub/convert.py`` runs this command from a checkout.
"""
import argparse
import sys
from pathlib import Path
from typing import List, Optional, Tuple

from ..weights.sources import (
    DEFAULT_SOURCES_FILE, OfficialSource, Sha256MismatchError, SourceRecordError, check_sha256, file_sha256,
    load_sources)

__all__ = ['main']

TAG = 'orig_in1k'
MIN_CHECK_INPUT_SIZE = 32  # five 2x2 max-pools


class UsageError(ValueError):
    """Arguments that cannot work; the message says which and what to do."""


def _parse_args(argv: Optional[List[str]], prog: Optional[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=prog or 'timm-san convert',
        description='Convert an official SAN checkpoint (.pth from the Google Drive release) into a Hub-ready folder.')
    parser.add_argument('checkpoint', help='official checkpoint file, e.g. model_best.pth')
    parser.add_argument('--model', required=True, help='SAN architecture it holds, e.g. san10_pairwise')
    parser.add_argument('--out', required=True, help='folder to write (must not exist unless --overwrite)')
    parser.add_argument('--repo-id', default=None,
                        help=f'Hub repository the card names (default <org>/<model>.{TAG}, org from '
                             f'timm_san.weights.hub_ids)')
    parser.add_argument('--sources', default=str(DEFAULT_SOURCES_FILE),
                        help='record of the official checkpoints and their sha256 (default: %(default)s)')
    parser.add_argument('--ignore-sha256', action='store_true',
                        help='convert even when the file differs from the recorded sha256')
    parser.add_argument('--overwrite', action='store_true', help='replace an existing --out folder')
    parser.add_argument('--check-input-size', type=int, default=224,
                        help='side of the random images the written folder is checked on (default: %(default)s)')
    return parser.parse_args(argv)


def _preflight(args: argparse.Namespace) -> Tuple[OfficialSource, str, str]:
    """The checks that need no model: arguments, the record of the checkpoint, its sha256.

    Returns:
        The checkpoint's record, its sha256 and what the sha256 check found.
    """
    sources = load_sources(args.sources)
    if args.model not in sources:
        raise UsageError(
            f'Unknown model {args.model!r}: the official checkpoints are of {", ".join(sorted(sources))}.')
    if args.check_input_size < MIN_CHECK_INPUT_SIZE:
        raise UsageError(f'--check-input-size must be at least {MIN_CHECK_INPUT_SIZE}, got {args.check_input_size}.')
    out_dir = Path(args.out)
    if out_dir.exists() and not args.overwrite:
        raise UsageError(f'{out_dir.absolute()} already exists; choose another --out or pass --overwrite.')
    checkpoint = Path(args.checkpoint)
    if not checkpoint.is_file():
        raise UsageError(f'No checkpoint file at {str(checkpoint)!r}.')
    source = sources[args.model]
    sha256 = file_sha256(checkpoint)
    try:
        report = check_sha256(source, sha256, checkpoint.name)
    except Sha256MismatchError as e:
        if not args.ignore_sha256:
            raise
        report = f'{e} Converting anyway (--ignore-sha256).'
    return source, sha256, report


def main(argv: Optional[List[str]] = None, prog: Optional[str] = None) -> int:
    """Convert one checkpoint; 0 on success, 1 (and a message on stderr) when nothing was written."""
    args = _parse_args(argv, prog)
    name = prog or 'timm-san convert'
    try:
        source, sha256, sha256_report = _preflight(args)
    except (UsageError, SourceRecordError, Sha256MismatchError) as e:
        print(f'{name}: error: {e}', file=sys.stderr)
        return 1
    print(sha256_report, flush=True)

    # torch, timm and the models load only now, so that a wrong argument or sha256 is reported at once
    from ..weights.conversion import ConversionError, write_hub_folder
    from ..weights.hub_ids import hf_hub_id

    out_dir = Path(args.out).absolute()
    repo_id = args.repo_id or hf_hub_id(f'{args.model}.{TAG}')
    try:
        sizes = write_hub_folder(
            Path(args.checkpoint), args.model, out_dir, repo_id, source, sha256,
            overwrite=args.overwrite, check_input_size=args.check_input_size)
    except ConversionError as e:
        print(f'{name}: error: {e}', file=sys.stderr)
        return 1
    print(f'Wrote {out_dir}: {", ".join(f"{file} ({size} bytes)" for file, size in sizes.items())}.')
    print('Checked: the folder loads back through timm (local-dir:) with the checkpoint\'s weights and outputs.')
    print(f'Publish it with: timm-san upload {out_dir} --repo-id {repo_id}')
    return 0
