""" hub/publish.py against the Hub look-alike on 127.0.0.1: dry run, upload, refusal to overwrite, and a load of
what was published

Uploads run through huggingface_hub's LFS protocol with ``HF_HUB_DISABLE_XET=1`` (the test server does not speak
Xet; the real Hub takes either).
"""
import json
import shutil
import sys

import pytest

from hub_server import MockHub
from hub_testing import (
    HUB_DIR, MODEL, REPO_ID, TAG, assert_same_weights, checkpoint_reference, clean_env, load_in_subprocess,
    loaded_results, run, shared_conversion)

TOKEN = 'hf_test_token_for_the_local_server'


@pytest.fixture(scope='module')
def conversion(tmp_path_factory):
    return shared_conversion(tmp_path_factory)


@pytest.fixture
def hub():
    with MockHub(token=TOKEN) as server:
        yield server


def _publish(hub, tmp_path, *args, token=TOKEN):
    env = clean_env(HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path / 'hf_home'), HF_TOKEN=token, HF_HUB_DISABLE_XET='1')
    return run([sys.executable, str(HUB_DIR / 'publish.py'), *map(str, args)], env=env)


def test_dry_run_lists_and_uploads_nothing(hub, conversion, tmp_path):
    _, folder, _ = conversion
    result = _publish(hub, tmp_path, folder, '--dry-run')
    assert result.returncode == 0, result.stderr
    assert f'{folder} -> {REPO_ID} (new repository)' in result.stdout
    assert f'Dry run: {REPO_ID}: would upload model.safetensors, config.json, README.md.' in result.stdout
    assert not hub.repos
    assert not [key for key in hub.requests if key[0] in ('POST', 'PUT') and key[1] != '/api/validate-yaml']


def test_upload_then_load_what_was_published(hub, conversion, tmp_path):
    checkpoint, folder, _ = conversion
    result = _publish(hub, tmp_path, folder)
    assert result.returncode == 0, result.stderr
    assert f'{REPO_ID}: uploaded model.safetensors, config.json, README.md' in result.stdout
    assert hub.repos[REPO_ID].files['model.safetensors'] == (folder / 'model.safetensors').read_bytes()
    assert hub.requests[('POST', f'/{REPO_ID}.git/info/lfs/objects/batch')] == 1  # weights went through LFS

    again = _publish(hub, tmp_path, folder)
    assert again.returncode == 0, again.stderr
    assert f'{REPO_ID}: up to date, nothing to upload.' in again.stdout
    assert hub.requests[('POST', f'/api/models/{REPO_ID}/commit/main')] == 1

    home = tmp_path / 'load_home'
    loaded = load_in_subprocess(MODEL, tmp_path / 'loaded', clean_env(HF_ENDPOINT=hub.url, HF_HOME=str(home)))
    assert loaded.returncode == 0, loaded.stderr
    weights, logits = loaded_results(tmp_path / 'loaded')
    expected_weights, expected_logits = checkpoint_reference(checkpoint)
    assert_same_weights(expected_weights, weights)
    assert (logits == expected_logits).all()


def test_refuses_to_overwrite_different_files(hub, conversion, tmp_path):
    _, folder, _ = conversion
    hub.add_folder(REPO_ID, folder)
    changed = tmp_path / folder.name
    shutil.copytree(folder, changed)
    (changed / 'README.md').write_text((folder / 'README.md').read_text() + '\nAn edit.\n')
    commit_before = hub.repos[REPO_ID].commit

    dry = _publish(hub, tmp_path, changed, '--dry-run')
    assert dry.returncode == 0, dry.stderr
    assert 'README.md: differs from the Hub' in dry.stdout and 'model.safetensors: unchanged, skipped' in dry.stdout
    assert f'Dry run: {REPO_ID}: would refuse to overwrite README.md.' in dry.stdout

    refused = _publish(hub, tmp_path, changed)
    assert refused.returncode == 1
    assert f'{REPO_ID} already holds README.md with other content' in refused.stderr
    assert '--overwrite' in refused.stderr
    assert hub.repos[REPO_ID].commit == commit_before

    forced = _publish(hub, tmp_path, changed, '--overwrite')
    assert forced.returncode == 0, forced.stderr
    assert f'{REPO_ID}: uploaded README.md' in forced.stdout
    assert hub.repos[REPO_ID].files['README.md'] == (changed / 'README.md').read_bytes()


def test_several_folders_at_once_and_bad_input(hub, conversion, tmp_path):
    _, folder, _ = conversion
    other = tmp_path / 'san10_pairwise.other_in1k'
    shutil.copytree(folder, other)
    config = json.loads((other / 'config.json').read_text())
    config['pretrained_cfg']['tag'] = 'other_in1k'
    (other / 'config.json').write_text(json.dumps(config))

    result = _publish(hub, tmp_path, folder, other, '--org', 'mirror-org')
    assert result.returncode == 0, result.stderr
    # each folder goes to the repository its config.json names: <org>/<architecture>.<tag>
    for tag in (TAG, 'other_in1k'):
        assert f'mirror-org/{MODEL}.{tag}: uploaded model.safetensors, config.json, README.md' in result.stdout
    assert sorted(hub.repos) == sorted([f'mirror-org/{MODEL}.{TAG}', f'mirror-org/{MODEL}.other_in1k'])

    same = _publish(hub, tmp_path, folder, folder)
    assert same.returncode == 1 and f'Several folders would go to {REPO_ID}' in same.stderr
    both = _publish(hub, tmp_path, folder, other, '--repo-id', 'a/b')
    assert both.returncode == 1 and '--repo-id names the repository of one folder' in both.stderr

    (other / 'model.safetensors').write_bytes((folder / 'model.safetensors').read_bytes()[:1000])
    damaged = _publish(hub, tmp_path, other, '--repo-id', 'a/b')
    assert damaged.returncode == 1 and 'not a valid safetensors file' in damaged.stderr

    (other / 'config.json').unlink()
    incomplete = _publish(hub, tmp_path, other, '--repo-id', 'a/b')
    assert incomplete.returncode == 1 and 'lacks config.json' in incomplete.stderr
    assert 'a/b' not in hub.repos and REPO_ID not in hub.repos


def test_token_comes_from_where_huggingface_hub_looks(hub, conversion, tmp_path):
    _, folder, _ = conversion
    result = _publish(hub, tmp_path, folder, token='hf_wrong_token')
    assert result.returncode == 1
    assert 'the Hub refused a request' in result.stderr and 'HF_TOKEN' in result.stderr
    assert not hub.repos
