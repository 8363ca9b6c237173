""" ``timm-san download NAME... | --all``: the official SAN weights, checked and converted for timm

    timm-san download san10_patchwise
    timm-san download --all --cache-dir /data/timm-san

Each checkpoint is fetched from the release's Google Drive (gdown: ``pip install "timm-san[download]"``), checked
(sha256 once recorded, and that it fits the model), converted into ``<cache>/<name>.orig_in1k`` (safetensors and
timm's config.json) and loaded back before the folder appears; a folder already there is used as it is. The command
then prints the lines that load each folder.
"""
import argparse
import sys
from typing import List, Optional

from ..weights.download import CACHE_ENV, DownloadError, default_cache_dir, fetch_official, load_instructions
from ..weights.sources import DEFAULT_SOURCES_FILE, SourceRecordError, load_sources

__all__ = ['main']

PROG = 'timm-san download'


def _parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=PROG, description='Download the official SAN weights, check them and convert them for timm.')
    parser.add_argument('models', nargs='*', metavar='NAME', help='models to download, e.g. san10_patchwise')
    parser.add_argument('--all', action='store_true', help='all six official models')
    parser.add_argument('--cache-dir', default=None,
                        help=f'where the converted folders go (default: ${CACHE_ENV}, else {default_cache_dir()})')
    parser.add_argument('--force', action='store_true', help='download and convert again, replacing the folder')
    parser.add_argument('--quiet', action='store_true', help='no progress bar')
    parser.add_argument('--sources', default=str(DEFAULT_SOURCES_FILE), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def print_load_lines(model_name: str, folder) -> None:
    """The lines that load a converted folder, in Python and in timm's scripts."""
    lines = load_instructions(model_name, folder)
    print(f'{model_name}: {folder}')
    print(f'  Python (after import timm_san): {lines["python"]}')
    print(f'  timm-san run validate.py {lines["validate.py"]} ...')
    print(f'  python train.py --device-modules timm_san {lines["train.py"]} ...')


def main(argv: Optional[List[str]] = None) -> int:
    """Download the models asked for; 0 when all are in the cache, 1 when one failed, 2 for bad arguments."""
    args = _parse_args(argv)
    try:
        sources = load_sources(args.sources)
    except SourceRecordError as e:
        print(f'{PROG}: error: {e}', file=sys.stderr)
        return 1
    unknown = [name for name in args.models if name not in sources]
    if unknown or not (args.models or args.all):
        what = f'unknown model {unknown[0]!r}' if unknown else 'name the models to download, or pass --all'
        print(f'{PROG}: error: {what}; the official checkpoints are of {", ".join(sources)}.', file=sys.stderr)
        return 2
    names = list(sources) if args.all else list(dict.fromkeys(args.models))
    fetched, failed = [], []
    for name in names:
        try:
            result = fetch_official(sources[name], args.cache_dir, force=args.force, quiet=args.quiet)
        except DownloadError as e:
            print(f'{PROG}: error: {e}', file=sys.stderr)
            failed.append(name)
            continue
        print(result.report, flush=True)
        fetched.append(result)
    if fetched:
        print('\nLoad them:')
        for result in fetched:
            print_load_lines(result.model_name, result.folder)
    if failed:
        print(f'{PROG}: {len(failed)} of {len(names)} failed: {", ".join(failed)}.', file=sys.stderr)
        return 1
    return 0
