""" Pretrained SAN weights through timm and huggingface_hub, from a Hub look-alike served on 127.0.0.1

Every load runs in a fresh Python process with the environment a user sets (``HF_ENDPOINT`` at the test server,
``HF_HOME`` in a temporary folder, ``HF_HUB_OFFLINE``), so huggingface_hub reads its settings as it does for them.
"""
import shutil

import pytest

from hub_server import MockHub
from hub_testing import (
    DEFAULT_ORG, MODEL, REPO_ID, TAG, assert_same_weights, checkpoint_reference, clean_env, load_in_subprocess,
    loaded_results, shared_conversion)


@pytest.fixture(scope='module')
def conversion(tmp_path_factory):
    return shared_conversion(tmp_path_factory)


@pytest.fixture(scope='module')
def reference(conversion):
    checkpoint, _, _ = conversion
    return checkpoint_reference(checkpoint)


@pytest.fixture(scope='module')
def hub(conversion):
    _, folder, _ = conversion
    with MockHub() as server:
        server.add_folder(REPO_ID, folder)
        yield server


@pytest.fixture(scope='module')
def warm_home(tmp_path_factory, hub, reference):
    """An HF_HOME whose cache holds the weights after one ``pretrained=True`` load (checked in that test)."""
    home = tmp_path_factory.mktemp('hf_home_warm')
    gets_before = hub.count('GET', REPO_ID, 'model.safetensors')
    # TQDM_POSITION=-1: huggingface_hub shows its progress bars even though stderr is not a terminal here
    env = clean_env(HF_ENDPOINT=hub.url, HF_HOME=str(home), TQDM_POSITION='-1')
    result = load_in_subprocess(MODEL, home / 'first', env)
    assert result.returncode == 0, result.stderr
    assert hub.count('GET', REPO_ID, 'model.safetensors') == gets_before + 1
    assert 'model.safetensors: 100%' in result.stderr  # huggingface_hub's own progress bar
    weights, logits = loaded_results(home / 'first')
    assert_same_weights(reference[0], weights)
    assert (logits == reference[1]).all()
    return home


def _assert_matches(reference, prefix):
    weights, logits = loaded_results(prefix)
    assert_same_weights(reference[0], weights)
    assert (logits == reference[1]).all()


def test_pretrained_downloads_then_uses_the_cache(hub, warm_home, reference):
    cached = warm_home / 'hub' / f'models--{DEFAULT_ORG}--{MODEL}.{TAG}'
    assert len(list((cached / 'blobs').iterdir())) == 1  # model.safetensors; timm fetched no config for its own cfg
    gets_before = hub.count('GET', REPO_ID, 'model.safetensors')
    result = load_in_subprocess(MODEL, warm_home / 'second', clean_env(HF_ENDPOINT=hub.url, HF_HOME=str(warm_home)))
    assert result.returncode == 0, result.stderr
    assert hub.count('GET', REPO_ID, 'model.safetensors') == gets_before  # no second download
    _assert_matches(reference, warm_home / 'second')


def test_offline_with_warm_cache(hub, warm_home, reference):
    requests_before = sum(hub.requests.values())
    env = clean_env(HF_ENDPOINT=hub.url, HF_HOME=str(warm_home), HF_HUB_OFFLINE='1')
    result = load_in_subprocess(MODEL, warm_home / 'offline', env)
    assert result.returncode == 0, result.stderr
    assert sum(hub.requests.values()) == requests_before  # not one request reached the server
    _assert_matches(reference, warm_home / 'offline')


def test_offline_with_cold_cache_says_so(hub, tmp_path):
    env = clean_env(HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path), HF_HUB_OFFLINE='1')
    result = load_in_subprocess(MODEL, tmp_path / 'x', env)
    assert result.returncode != 0
    assert 'LocalEntryNotFoundError' in result.stderr
    assert 'offline mode is enabled' in result.stderr
    assert f'timm-san: the pretrained weights of {MODEL} ({REPO_ID}) are not in the cache {tmp_path}' in result.stderr


def test_hf_hub_prefix_uses_the_repository_config(hub, reference, tmp_path):
    config_gets = hub.count('GET', REPO_ID, 'config.json')
    result = load_in_subprocess(f'hf-hub:{REPO_ID}', tmp_path / 'hf', clean_env(HF_ENDPOINT=hub.url,
                                                                             HF_HOME=str(tmp_path)))
    assert result.returncode == 0, result.stderr
    assert hub.count('GET', REPO_ID, 'config.json') == config_gets + 1
    _assert_matches(reference, tmp_path / 'hf')


def test_interrupted_transfer_is_resumed(hub, reference, tmp_path):
    hub.cut_once.add((REPO_ID, 'model.safetensors'))
    result = load_in_subprocess(MODEL, tmp_path / 'cut', clean_env(HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path)))
    assert result.returncode == 0, result.stderr
    assert not hub.cut_once
    _assert_matches(reference, tmp_path / 'cut')


def test_missing_repository(hub, tmp_path):
    env = clean_env(HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path), TIMM_SAN_HF_HUB_ORG='nobody')
    result = load_in_subprocess(MODEL, tmp_path / 'x', env)
    assert result.returncode != 0
    assert 'RepositoryNotFoundError' in result.stderr
    assert f'nobody/{MODEL}.{TAG}' in result.stderr
    assert f'timm-san: the pretrained weights of {MODEL} were looked for in nobody/{MODEL}.{TAG}' in result.stderr


def test_missing_weights_file(hub, conversion, tmp_path):
    _, folder, _ = conversion
    hub.add_folder('someone/no-weights', folder)
    del hub.repos['someone/no-weights'].files['model.safetensors']
    env = clean_env(HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path))
    result = load_in_subprocess('hf-hub:someone/no-weights', tmp_path / 'x', env)
    assert result.returncode != 0
    assert 'EntryNotFoundError' in result.stderr
    assert 'timm tries model.safetensors, then pytorch_model.bin' in result.stderr


def test_truncated_file_on_the_hub(hub, conversion, tmp_path):
    _, folder, _ = conversion
    repo = hub.add_folder('someone/truncated', folder)
    repo.set_files({'model.safetensors': repo.files['model.safetensors'][:100_000]})
    env = clean_env(HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path))
    result = load_in_subprocess('hf-hub:someone/truncated', tmp_path / 'x', env)
    assert result.returncode != 0
    assert 'CheckpointReadError' in result.stderr
    assert 'model.safetensors of someone/truncated) are not a valid safetensors file' in result.stderr
    assert 'is itself damaged' in result.stderr


def test_corrupt_cached_copy_and_the_advice_that_fixes_it(hub, warm_home, reference, tmp_path):
    home = tmp_path / 'home'
    shutil.copytree(warm_home / 'hub', home / 'hub', symlinks=True)
    repo_cache = home / 'hub' / f'models--{DEFAULT_ORG}--{MODEL}.{TAG}'
    blob = next((repo_cache / 'blobs').iterdir())
    data = bytearray(blob.read_bytes())
    data[:8] = b'\xff' * 8  # the header length: the file no longer parses
    blob.write_bytes(bytes(data))
    env = clean_env(HF_ENDPOINT=hub.url, HF_HOME=str(home))
    result = load_in_subprocess(MODEL, tmp_path / 'x', env)
    assert result.returncode != 0
    assert 'CheckpointReadError' in result.stderr
    assert 'is damaged: its sha256 is' in result.stderr
    assert f'Delete {repo_cache} and load again' in result.stderr

    shutil.rmtree(repo_cache)
    result = load_in_subprocess(MODEL, tmp_path / 'again', env)
    assert result.returncode == 0, result.stderr
    _assert_matches(reference, tmp_path / 'again')
