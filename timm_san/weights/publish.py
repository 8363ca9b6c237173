""" Converted folders -> Hugging Face Hub repositories, each file compared with the repository's before any upload

Uploads go through huggingface_hub (``HfApi``), which takes the endpoint from ``HF_ENDPOINT`` and the token from
where it always looks (``HF_TOKEN``, or the token ``hf auth login`` saved). Every folder is checked and compared
with its repository before anything is uploaded: files that are already there unchanged are skipped, and a
repository holding a file of the same name with other content is left alone unless ``overwrite`` is given.
"""
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

from huggingface_hub import HfApi
from huggingface_hub.errors import RepositoryNotFoundError
from huggingface_hub.hf_api import RepoFile
from huggingface_hub.utils.sha import git_hash, sha_fileobj

from .checkpoint import checkpoint_file_problem

__all__ = ['FILES', 'Plan', 'PublishError', 'check_folder', 'default_repo_id', 'plan_folders', 'publish_plans']

FILES = ('model.safetensors', 'config.json', 'README.md')


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


def check_folder(folder: Path) -> Dict:
    """The folder's config, once it is known to hold what a conversion writes and valid safetensors.

    Raises:
        PublishError: A file is missing, config.json is not a timm config, or the weights do not read.
    """
    missing = [name for name in FILES if not (folder / name).is_file()]
    if missing:
        raise PublishError(f'{folder} lacks {", ".join(missing)}: publish folders written by timm-san convert or '
                           f'timm-san download.')
    try:
        config = json.loads((folder / 'config.json').read_text(encoding='utf-8'))
        config['architecture'], config['pretrained_cfg']
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise PublishError(f'{folder}/config.json is not a timm config ({e!r}); write the folder again.') from e
    problem = checkpoint_file_problem(str(folder / 'model.safetensors'))
    if problem is not None:
        raise PublishError(f'{folder}/model.safetensors: {problem}; write the folder again (timm-san convert, or '
                           f'timm-san download --force).')
    return config


def default_repo_id(config: Dict, org: str, folder: Path) -> str:
    """``<org>/<architecture>.<tag>`` from a folder's config.json."""
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


def plan_folders(api: HfApi, folders: Sequence[Path], repo_ids: Sequence[str], revision: Optional[str]) -> List[Plan]:
    """Check every folder and compare it with its repository; nothing is uploaded.

    Raises:
        PublishError: A folder is not fit to publish, or two folders would go to one repository.
    """
    repeated = sorted({repo_id for repo_id in repo_ids if list(repo_ids).count(repo_id) > 1})
    if repeated:
        raise PublishError(f'Several folders would go to {", ".join(repeated)}; publish one folder per repository.')
    for folder in folders:
        check_folder(folder)
    return [_plan(api, folder, repo_id, revision) for folder, repo_id in zip(folders, repo_ids)]


def _upload(api: HfApi, plan: Plan, revision: Optional[str], private: bool) -> str:
    api.create_repo(plan.repo_id, exist_ok=True, private=private)
    action = 'Update' if plan.repo_exists else 'Add'
    commit = api.upload_folder(
        repo_id=plan.repo_id, folder_path=str(plan.folder), allow_patterns=plan.to_upload, revision=revision,
        commit_message=f'{action} {plan.repo_id.split("/")[-1]} converted from the official SAN checkpoint')
    check = _plan(api, plan.folder, plan.repo_id, revision)
    if check.new or check.differ:
        raise PublishError(f'After uploading, {plan.repo_id} still lacks or differs in '
                           f'{", ".join(check.new + check.differ)}; publish again.')
    return commit.commit_url


def publish_plans(
        api: HfApi,
        plans: Sequence[Plan],
        dry_run: bool = False,
        overwrite: bool = False,
        private: bool = False,
        revision: Optional[str] = None,
        log: Callable[[str], None] = print,
) -> None:
    """Upload what the plans say, or with ``dry_run`` say what would be uploaded.

    Raises:
        PublishError: A repository holds a file with other content and ``overwrite`` is False (nothing is
            uploaded then), or a file did not arrive.
    """
    log(f'Hub: {api.endpoint}')
    for plan in plans:
        log(plan.describe())
    refused = [plan for plan in plans if plan.differ and not overwrite]
    if dry_run:
        for plan in plans:
            verb = 'would refuse to overwrite' if plan in refused else 'would upload'
            names = plan.differ if plan in refused else plan.to_upload
            log(f'Dry run: {plan.repo_id}: {verb} {", ".join(names) or "nothing"}.')
        return
    if refused:
        raise PublishError('; '.join(
            f'{plan.repo_id} already holds {", ".join(plan.differ)} with other content' for plan in refused)
            + '. Nothing was uploaded. Check with --dry-run, then pass --overwrite to replace them.')
    for plan in plans:
        if not plan.to_upload:
            log(f'{plan.repo_id}: up to date, nothing to upload.')
            continue
        url = _upload(api, plan, revision, private)
        log(f'{plan.repo_id}: uploaded {", ".join(plan.to_upload)} ({url}).')
