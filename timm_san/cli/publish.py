""" ``timm-san publish NAME... | --all [--dry-run]``: the official weights onto the Hugging Face Hub, in one command

For each model: download the official checkpoint and check it (``timm-san download``: sha256 once recorded, the
misfit check, conversion and card, the folder loaded back), record its sha256 in ``official_checkpoints.json`` where
none is recorded yet (the first run), then compare each folder with its repository and upload what is new. Any
failure before the upload stops everything: nothing is uploaded. ``--dry-run`` downloads and converts but records
and uploads nothing. The endpoint is ``HF_ENDPOINT`` if set; the token is ``HF_TOKEN`` or ``hf auth login``'s.
"""
import argparse
import sys
from pathlib import Path
from typing import List, Optional

from huggingface_hub.errors import HfHubHTTPError

from ..weights.download import CACHE_ENV, TAG, DownloadError, default_cache_dir, fetch_official
from ..weights.hub_ids import HF_HUB_ORG
from ..weights.publish import PublishError, plan_folders, publish_plans
from ..weights.sources import DEFAULT_SOURCES_FILE, SourceRecordError, load_sources, record_sha256
from .upload import hub_refused

__all__ = ['main']

PROG = 'timm-san publish'


class _UsageError(ValueError):
    """Arguments that cannot work."""


def _parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=PROG, description='Download, verify, convert and upload the official SAN weights to the Hub.')
    parser.add_argument('models', nargs='*', metavar='NAME', help='models to publish, e.g. san10_patchwise')
    parser.add_argument('--all', action='store_true', help='all six official models')
    parser.add_argument('--dry-run', action='store_true',
                        help='download and convert, then say what would be recorded and uploaded; change nothing')
    parser.add_argument('--org', default=HF_HUB_ORG, help='organisation of the repositories (default: %(default)s)')
    parser.add_argument('--overwrite', action='store_true',
                        help='replace files on the Hub whose content differs from the converted ones')
    parser.add_argument('--private', action='store_true', help='create new repositories private')
    parser.add_argument('--revision', default=None, help='branch to upload to (default: main)')
    parser.add_argument('--cache-dir', default=None,
                        help=f'where the converted folders go (default: ${CACHE_ENV}, else {default_cache_dir()})')
    parser.add_argument('--force-download', action='store_true', help='download and convert again')
    parser.add_argument('--sources', default=str(DEFAULT_SOURCES_FILE),
                        help='record of the official checkpoints, where sha256 are recorded (default: %(default)s)')
    return parser.parse_args(argv)


def _publish(args: argparse.Namespace) -> None:
    from huggingface_hub import HfApi

    sources = load_sources(args.sources)
    unknown = [name for name in args.models if name not in sources]
    if unknown or not (args.models or args.all):
        what = f'unknown model {unknown[0]!r}' if unknown else 'name the models to publish, or pass --all'
        raise _UsageError(f'{what}; the official checkpoints are of {", ".join(sources)}.')
    names = list(sources) if args.all else list(dict.fromkeys(args.models))
    fetched = []
    for name in names:
        result = fetch_official(sources[name], args.cache_dir, force=args.force_download)
        print(result.report, flush=True)
        fetched.append(result)

    for result in fetched:
        source = sources[result.model_name]
        if source.sha256 is not None:
            continue
        if result.sha256 is None:
            raise PublishError(f'{result.folder} does not say which file it was converted from '
                               f'(no timm_san_source.json): pass --force-download.')
        if args.dry_run:
            print(f'Dry run: would record sha256 {result.sha256} for {result.model_name} in {args.sources}.')
        elif record_sha256(result.model_name, result.sha256, args.sources):
            print(f'Recorded sha256 {result.sha256} for {result.model_name} in {Path(args.sources).resolve()}.')

    api = HfApi()
    folders = [result.folder for result in fetched]
    repo_ids = [f'{args.org}/{result.model_name}.{TAG}' for result in fetched]
    plans = plan_folders(api, folders, repo_ids, args.revision)
    publish_plans(api, plans, dry_run=args.dry_run, overwrite=args.overwrite, private=args.private,
                  revision=args.revision)


def main(argv: Optional[List[str]] = None) -> int:
    """Publish the models asked for; 0 on success, 1 when nothing (more) was uploaded, 2 for bad arguments."""
    args = _parse_args(argv)
    try:
        _publish(args)
    except _UsageError as e:
        print(f'{PROG}: error: {e}', file=sys.stderr)
        return 2
    except DownloadError as e:
        print(f'{PROG}: error: {e} Nothing was uploaded.', file=sys.stderr)
        return 1
    except (PublishError, SourceRecordError) as e:
        print(f'{PROG}: error: {e}', file=sys.stderr)
        return 1
    except HfHubHTTPError as e:
        print(f'{PROG}: error: {hub_refused(e)}', file=sys.stderr)
        return 1
    return 0
