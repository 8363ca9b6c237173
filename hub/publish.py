#!/usr/bin/env python3
""" Publish folders written by convert.py to the Hugging Face Hub

    python hub/publish.py hub-out/san10_pairwise.orig_in1k --repo-id timm-san/san10_pairwise.orig_in1k
    python hub/publish.py hub-out/* --dry-run      # all six, each to the repository its pretrained cfg names

Uploads go through huggingface_hub (``HfApi``), which takes the endpoint from ``HF_ENDPOINT`` and the token from
where it always looks (``HF_TOKEN``, or the token ``hf auth login`` saved). Every folder is checked and compared
with its repository before anything is uploaded: files that are already there unchanged are skipped, and a
repository holding a file of the same name with other content is left alone unless ``--overwrite`` is given.
"""
import argparse
import importlib.util
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

from huggingface_hub import HfApi
from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError
from huggingface_hub.hf_api import RepoFile
from huggingface_hub.utils.sha import git_hash, sha_fileobj
from safetensors import SafetensorError, safe_open

FILES = ('model.safetensors', 'config.json', 'README.md')


def _default_org() -> str:
    """``timm_san.hub_ids.HF_HUB_ORG``, the one place naming the organisation.

    The module is loaded by itself: importing the ``timm_san`` package would load the models, and torch, which
    publishing does not need.
    """
    package = importlib.util.find_spec('timm_san')
    if package is None or not package.submodule_search_locations:
        raise PublishError('timm_san is not installed here; install it (pip install -e .) or pass --org.')
    path = Path(list(package.submodule_search_locations)[0]) / 'hub_ids.py'
    spec = importlib.util.spec_from_file_location('_timm_san_hub_ids', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.HF_HUB_ORG


class PublishError(RuntimeError):
    """A folder or repository that cannot be published as asked; the message says why and what to do."""


@dataclass
class Plan:
    """What publishing one folder to one repository would do."""
    folder: Path
    repo_id: str
    repo_exists: bool
    new: List[str] = field(default_factory=list)
    unchanged: List[str] = field(default_factory=list)
    differ: List[str] = field(default_factory=list)
    remote_only: List[str] = field(default_factory=list)

    @property
    def to_upload(self) -> List[str]:
        return self.new + self.differ

    def describe(self) -> str:
        lines = [f'{self.folder} -> {self.repo_id} ({"exists" if self.repo_exists else "new repository"})']
        for label, names in (('new', self.new), ('differs from the Hub', self.differ),
                             ('unchanged, skipped', self.unchanged), ('only on the Hub, left as is', self.remote_only)):
            lines += [f'  {name}: {label}' for name in names]
        return '\n'.join(lines)


def _parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description='Upload folders written by hub/convert.py to the Hugging Face Hub.')
    parser.add_argument('folders', nargs='+', help='folders written by convert.py')
    parser.add_argument('--repo-id', default=None,
                        help='repository to upload to (one folder only); default: <org>/<architecture>.<tag> '
                             'from the folder\'s config.json')
    parser.add_argument('--org', default=None, help='organisation of the default repository ids '
                                                    '(default: HF_HUB_ORG of timm_san.hub_ids)')
    parser.add_argument('--revision', default=None, help='branch to upload to (default: main)')
    parser.add_argument('--dry-run', action='store_true', help='list what would be uploaded, upload nothing')
    parser.add_argument('--overwrite', action='store_true',
                        help='replace files on the Hub whose content differs from the folder\'s')
    parser.add_argument('--private', action='store_true', help='create new repositories private')
    return parser.parse_args(argv)


def _check_folder(folder: Path) -> Dict:
    """The folder's config, once it is known to hold what convert.py writes and valid safetensors."""
    missing = [name for name in FILES if not (folder / name).is_file()]
    if missing:
        raise PublishError(f'{folder} lacks {", ".join(missing)}: publish folders written by hub/convert.py.')
    try:
        config = json.loads((folder / 'config.json').read_text(encoding='utf-8'))
        config['architecture'], config['pretrained_cfg']
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise PublishError(f'{folder}/config.json is not a timm config ({e!r}); write the folder again.') from e
    try:
        # the header is all that is read; numpy spares loading torch
        with safe_open(str(folder / 'model.safetensors'), framework='numpy') as f:
            f.keys()
    except (SafetensorError, OSError) as e:
        raise PublishError(f'{folder}/model.safetensors is not a valid safetensors file ({e}); write the folder '
                           f'again with hub/convert.py.') from e
    return config


def _default_repo_id(config: Dict, org: str, folder: Path) -> str:
    tag = config['pretrained_cfg'].get('tag')
    if not tag:
        raise PublishError(f'{folder}/config.json names no pretrained tag; pass --repo-id.')
    return f'{org}/{config["architecture"]}.{tag}'


def _plan(api: HfApi, folder: Path, repo_id: str, revision: Optional[str]) -> Plan:
    """Compare the folder's files with the repository's by content hash (sha256 for LFS files, git oid else)."""
    try:
        remote = {f.path: f for f in api.list_repo_tree(repo_id, recursive=True, revision=revision)
                  if isinstance(f, RepoFile)}
        plan = Plan(folder, repo_id, repo_exists=True)
    except RepositoryNotFoundError:
        remote, plan = {}, Plan(folder, repo_id, repo_exists=False)
    for name in FILES:
        if name not in remote:
            plan.new.append(name)
            continue
        path = folder / name
        if remote[name].lfs is not None:
            with open(path, 'rb') as f:
                same = sha_fileobj(f).hex() == remote[name].lfs.sha256
        else:
            same = git_hash(path.read_bytes()) == remote[name].blob_id
        (plan.unchanged if same else plan.differ).append(name)
    plan.remote_only = sorted(set(remote) - set(FILES))
    return plan


def _upload(api: HfApi, plan: Plan, revision: Optional[str], private: bool) -> str:
    api.create_repo(plan.repo_id, exist_ok=True, private=private)
    action = 'Update' if plan.repo_exists else 'Add'
    commit = api.upload_folder(
        repo_id=plan.repo_id, folder_path=str(plan.folder), allow_patterns=plan.to_upload, revision=revision,
        commit_message=f'{action} {plan.repo_id.split("/")[-1]} converted from the official SAN checkpoint')
    check = _plan(api, plan.folder, plan.repo_id, revision)
    if check.new or check.differ:
        raise PublishError(f'After uploading, {plan.repo_id} still lacks or differs in '
                           f'{", ".join(check.new + check.differ)}; run publish.py again.')
    return commit.commit_url


def publish(args: argparse.Namespace) -> int:
    folders = [Path(f) for f in args.folders]
    if args.repo_id and len(folders) > 1:
        raise PublishError('--repo-id names the repository of one folder; leave it out to publish several.')
    api = HfApi()
    org = args.org or (None if args.repo_id else _default_org())
    plans = []
    for folder in folders:
        config = _check_folder(folder)
        repo_id = args.repo_id or _default_repo_id(config, org, folder)
        plans.append(_plan(api, folder, repo_id, args.revision))
    repo_ids = [plan.repo_id for plan in plans]
    repeated = sorted({repo_id for repo_id in repo_ids if repo_ids.count(repo_id) > 1})
    if repeated:
        raise PublishError(f'Several folders would go to {", ".join(repeated)}; publish one folder per repository.')
    print(f'Hub: {api.endpoint}')
    for plan in plans:
        print(plan.describe())
    refused = [plan for plan in plans if plan.differ and not args.overwrite]
    if args.dry_run:
        for plan in plans:
            verb = 'would refuse to overwrite' if plan in refused else 'would upload'
            names = plan.differ if plan in refused else plan.to_upload
            print(f'Dry run: {plan.repo_id}: {verb} {", ".join(names) or "nothing"}.')
        return 0
    if refused:
        raise PublishError('; '.join(
            f'{plan.repo_id} already holds {", ".join(plan.differ)} with other content' for plan in refused)
            + '. Nothing was uploaded. Check with --dry-run, then pass --overwrite to replace them.')
    for plan in plans:
        if not plan.to_upload:
            print(f'{plan.repo_id}: up to date, nothing to upload.')
            continue
        url = _upload(api, plan, args.revision, args.private)
        print(f'{plan.repo_id}: uploaded {", ".join(plan.to_upload)} ({url}).')
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    args = _parse_args(argv)
    try:
        return publish(args)
    except PublishError as e:
        print(f'publish.py: error: {e}', file=sys.stderr)
        return 1
    except HfHubHTTPError as e:
        print(f'publish.py: error: the Hub refused a request: {e}\nCheck the token (HF_TOKEN or `hf auth login`) '
              f'and its write access to the organisation.', file=sys.stderr)
        return 1


if __name__ == '__main__':
    sys.exit(main())
