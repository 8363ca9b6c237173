""" ``timm-san upload FOLDER...``: converted folders -> Hugging Face Hub repositories

    timm-san upload hub-out/san10_pairwise.orig_in1k --repo-id timm-san/san10_pairwise.orig_in1k
    timm-san upload hub-out/* --dry-run      # several, each to the repository its config.json names

The endpoint is ``HF_ENDPOINT`` if set, the token where huggingface_hub looks (``HF_TOKEN``, ``hf auth login``).
``hub/publish.py`` runs this command from a checkout.
"""
import argparse
import sys
from pathlib import Path
from typing import List, Optional

from huggingface_hub.errors import HfHubHTTPError

from ..weights.hub_ids import HF_HUB_ORG
from ..weights.publish import PublishError, check_folder, default_repo_id, plan_folders, publish_plans

__all__ = ['main', 'hub_refused']


def _parse_args(argv: Optional[List[str]], prog: Optional[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=prog or 'timm-san upload',
        description='Upload folders written by timm-san convert or timm-san download to the Hugging Face Hub.')
    parser.add_argument('folders', nargs='+', help='converted folders')
    parser.add_argument('--repo-id', default=None,
                        help='repository to upload to (one folder only); default: <org>/<architecture>.<tag> '
                             'from the folder\'s config.json')
    parser.add_argument('--org', default=None, help=f'organisation of the default repository ids (default: '
                                                    f'{HF_HUB_ORG}, from timm_san.weights.hub_ids)')
    parser.add_argument('--revision', default=None, help='branch to upload to (default: main)')
    parser.add_argument('--dry-run', action='store_true', help='list what would be uploaded, upload nothing')
    parser.add_argument('--overwrite', action='store_true',
                        help='replace files on the Hub whose content differs from the folder\'s')
    parser.add_argument('--private', action='store_true', help='create new repositories private')
    return parser.parse_args(argv)


def hub_refused(error: HfHubHTTPError) -> str:
    """The message for a request the Hub refused while publishing."""
    return (f'the Hub refused a request: {error}\nCheck the token (HF_TOKEN or `hf auth login`) and its write '
            f'access to the organisation.')


def main(argv: Optional[List[str]] = None, prog: Optional[str] = None) -> int:
    """Upload the folders; 0 on success (or a dry run), 1 with a message on stderr."""
    from huggingface_hub import HfApi

    args = _parse_args(argv, prog)
    name = prog or 'timm-san upload'
    folders = [Path(f) for f in args.folders]
    try:
        if args.repo_id and len(folders) > 1:
            raise PublishError('--repo-id names the repository of one folder; leave it out to publish several.')
        org = args.org or HF_HUB_ORG
        repo_ids = [args.repo_id or default_repo_id(check_folder(folder), org, folder) for folder in folders]
        api = HfApi()
        plans = plan_folders(api, folders, repo_ids, args.revision)
        publish_plans(api, plans, dry_run=args.dry_run, overwrite=args.overwrite, private=args.private,
                      revision=args.revision)
    except PublishError as e:
        print(f'{name}: error: {e}', file=sys.stderr)
        return 1
    except HfHubHTTPError as e:
        print(f'{name}: error: {hub_refused(e)}', file=sys.stderr)
        return 1
    return 0
