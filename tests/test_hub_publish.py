""" hub/publish.py (timm-san upload) and timm-san publish against the Hub look-alike on 127.0.0.1: dry run, upload,
refusal to overwrite, and a load of what was published; publish also downloads from a Drive stand-in and records
the sha256

Uploads run through huggingface_hub's LFS protocol with ``HF_HUB_DISABLE_XET=1`` (the test server does not speak
Xet; the real Hub takes either).
"""
import hashlib
import json
import os
import shutil
import subprocess
import sys

import pytest

from drive_server import DriveStandIn
from hub_server import MockHub
from hub_testing import (
    HUB_DIR, MODEL, REPO_ID, TAG, assert_same_weights, checkpoint_reference, clean_env, load_in_subprocess,
    loaded_results, run, shared_conversion, write_official_checkpoint)
from timm_san.weights.sources import DEFAULT_SOURCES_FILE, load_sources

CONSOLE_SCRIPT = os.path.join(os.path.dirname(sys.executable), 'timm-san')

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


# -- timm-san publish: the official checkpoints from the Drive stand-in to the Hub stand-in, in one command --

def _publish_official(hub, drive, tmp_path, *args, token=TOKEN):
    env = clean_env(HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path / 'hf_home'), HF_TOKEN=token, HF_HUB_DISABLE_XET='1',
                    TIMM_SAN_DRIVE_URL=drive.url_template, TIMM_SAN_CACHE=str(tmp_path / 'cache'))
    return run([CONSOLE_SCRIPT, 'publish', *map(str, args)], env=env)


@pytest.fixture
def official(tmp_path):
    """A Drive stand-in serving an official-format san10_pairwise checkpoint, and a copy of the record."""
    checkpoint = write_official_checkpoint(tmp_path / 'model_best.pth')
    sources = tmp_path / 'official_checkpoints.json'
    shutil.copy(DEFAULT_SOURCES_FILE, sources)
    with DriveStandIn() as drive:
        drive.files[load_sources(sources)[MODEL].drive_file_id] = checkpoint.read_bytes()
        yield drive, checkpoint, sources


def test_publish_official_dry_run_then_for_real(hub, official, tmp_path):
    drive, checkpoint, sources = official
    sha256 = hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    record_before = sources.read_text()

    dry = _publish_official(hub, drive, tmp_path, MODEL, '--sources', sources, '--dry-run')
    assert dry.returncode == 0, dry.stderr
    assert f'{MODEL}: downloaded, checked and converted into {tmp_path / "cache" / f"{MODEL}.{TAG}"}' in dry.stdout
    assert f'Dry run: would record sha256 {sha256} for {MODEL}' in dry.stdout
    assert f'Dry run: {REPO_ID}: would upload model.safetensors, config.json, README.md.' in dry.stdout
    assert sources.read_text() == record_before and not hub.repos

    real = _publish_official(hub, drive, tmp_path, MODEL, '--sources', sources)
    assert real.returncode == 0, real.stderr
    assert f'{MODEL}: found' in real.stdout  # the dry run's conversion is reused: one download in all
    assert sum(drive.requests.values()) == 1
    assert f'Recorded sha256 {sha256} for {MODEL} in {sources}' in real.stdout
    assert load_sources(sources)[MODEL].sha256 == sha256
    assert [name for name, source in load_sources(sources).items() if source.sha256] == [MODEL]  # the rest as it was
    assert f'{REPO_ID}: uploaded model.safetensors, config.json, README.md' in real.stdout
    assert hashlib.sha256(checkpoint.read_bytes()).hexdigest() in hub.repos[REPO_ID].files['README.md'].decode()

    again = _publish_official(hub, drive, tmp_path, MODEL, '--sources', sources)
    assert again.returncode == 0, again.stderr
    assert f'{REPO_ID}: up to date, nothing to upload.' in again.stdout and 'Recorded' not in again.stdout

    loaded = load_in_subprocess(MODEL, tmp_path / 'loaded', clean_env(HF_ENDPOINT=hub.url,
                                                                      HF_HOME=str(tmp_path / 'load_home')))
    assert loaded.returncode == 0, loaded.stderr
    weights, logits = loaded_results(tmp_path / 'loaded')
    expected_weights, expected_logits = checkpoint_reference(checkpoint)
    assert_same_weights(expected_weights, weights)
    assert (logits == expected_logits).all()


def test_publish_official_uploads_nothing_when_a_check_fails(hub, official, tmp_path):
    drive, checkpoint, sources = official
    record = json.loads(sources.read_text())
    record['checkpoints'][MODEL]['sha256'] = hashlib.sha256(b'another file').hexdigest()
    sources.write_text(json.dumps(record))
    result = _publish_official(hub, drive, tmp_path, MODEL, '--sources', sources)
    assert result.returncode == 1
    assert 'has sha256' in result.stderr and 'Nothing was uploaded.' in result.stderr
    assert not hub.repos and not list((tmp_path / 'cache').iterdir())

    unknown = _publish_official(hub, drive, tmp_path, 'san11_pairwise')
    assert unknown.returncode == 2 and "unknown model 'san11_pairwise'" in unknown.stderr


def test_hub_scripts_work_outside_a_checkout(hub, conversion, tmp_path):
    """hub/convert.py and hub/publish.py import only the installed package, so a copy of them runs anywhere."""
    checkpoint, folder, _ = conversion
    for script in ('convert.py', 'publish.py'):
        shutil.copy(HUB_DIR / script, tmp_path / script)
    env = clean_env(HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path / 'hf_home'), HF_TOKEN=TOKEN, HF_HUB_DISABLE_XET='1')
    out = tmp_path / 'out'
    converted = subprocess.run(
        [sys.executable, 'convert.py', str(checkpoint), '--model', MODEL, '--out', str(out), '--check-input-size',
         '32'], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert converted.returncode == 0, converted.stderr
    published = subprocess.run([sys.executable, 'publish.py', str(out), '--dry-run'], cwd=tmp_path, env=env,
                               capture_output=True, text=True, timeout=300)
    assert published.returncode == 0, published.stderr
    assert f'Dry run: {REPO_ID}: would upload model.safetensors, config.json, README.md.' in published.stdout
