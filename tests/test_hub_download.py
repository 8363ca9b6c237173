""" Pretrained SAN weights through timm and huggingface_hub, from a Hub look-alike served on 127.0.0.1

Every load runs in a fresh Python process with the environment a user sets (``HF_ENDPOINT`` at the test server,
``HF_HOME`` in a temporary folder, ``HF_HUB_OFFLINE``), so huggingface_hub reads its settings as it does for them.
"""
import shutil
import socket
import sys
import time

import pytest

from hub_server import MockHub
from hub_testing import (
    DEFAULT_ORG, MODEL, REPO_ID, TAG, assert_same_weights, checkpoint_reference, clean_env, load_in_subprocess,
    loaded_results, run, shared_conversion)

WITHOUT_HUB = f'`timm-san download {MODEL}`'


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


@pytest.mark.parametrize('name', [MODEL, f'hf-hub:{REPO_ID}'])
def test_offline_with_cold_cache_says_so(hub, tmp_path, name):
    env = clean_env(HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path), HF_HUB_OFFLINE='1')
    result = load_in_subprocess(name, tmp_path / 'x', env)
    assert result.returncode != 0
    assert 'LocalEntryNotFoundError' in result.stderr
    assert (f'timm-san: offline mode (HF_HUB_OFFLINE) is on and the cache {tmp_path / "hub"} holds no weights of '
            f'{MODEL} ({REPO_ID})') in result.stderr
    assert WITHOUT_HUB in result.stderr


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


@pytest.mark.parametrize('name', [MODEL, f'hf-hub:nobody/{MODEL}.{TAG}'])
def test_missing_repository_says_not_published_after_one_request(hub, tmp_path, name):
    env = clean_env(HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path), TIMM_SAN_HF_HUB_ORG='nobody')
    before = sum(hub.requests.values())
    result = load_in_subprocess(name, tmp_path / 'x', env)
    assert result.returncode != 0
    assert 'RepositoryNotFoundError' in result.stderr
    assert (f'timm-san: the pretrained weights of {MODEL} are not published at {hub.url}: asked for '
            f'nobody/{MODEL}.{TAG}, the Hub answered that it has no such repository') in result.stderr
    assert WITHOUT_HUB in result.stderr and 'timm.create_model("local-dir:FOLDER", pretrained=True)' in result.stderr
    # one request, not one per file name timm tries, and no retries
    assert sum(hub.requests.values()) == before + 1


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@pytest.mark.parametrize('name', [MODEL, f'hf-hub:{REPO_ID}'])
def test_unreachable_endpoint_fails_fast(tmp_path, name):
    endpoint = f'http://127.0.0.1:{_closed_port()}'
    start = time.monotonic()
    result = load_in_subprocess(name, tmp_path / 'x', clean_env(HF_ENDPOINT=endpoint, HF_HOME=str(tmp_path)))
    elapsed = time.monotonic() - start
    assert result.returncode != 0
    assert 'LocalEntryNotFoundError' in result.stderr
    assert (f'timm-san: the pretrained weights of {MODEL} ({REPO_ID}) are not in the cache {tmp_path / "hub"}, and '
            f'{endpoint} could not be reached (ConnectError); asked once, without retries') in result.stderr
    assert WITHOUT_HUB in result.stderr
    assert 'Retrying' not in result.stderr  # huggingface_hub's back-off (25 s per file, 52 s in all) never ran
    assert elapsed < 40, f'{elapsed:.0f} s'


def test_demo_pretrained_without_weights_ends_in_one_line(hub, tmp_path):
    env = clean_env(HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path), TIMM_SAN_HF_HUB_ORG='nobody')
    result = run([sys.executable, '-m', 'timm_san', 'demo', '--pretrained', '--models', MODEL], env=env)
    assert result.returncode == 1
    assert 'Traceback' not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f'timm-san demo: error: the pretrained weights of {MODEL} are not published at '
                               f'{hub.url}')
    assert WITHOUT_HUB in lines[0]


def test_demo_pretrained_uses_the_download_cache(conversion, tmp_path):
    """A folder in the timm-san download cache is what the demo loads: no Hub request at all (none is running)."""
    _, folder, _ = conversion
    cache = tmp_path / 'cache'
    shutil.copytree(folder, cache / folder.name)
    env = clean_env(HF_ENDPOINT=f'http://127.0.0.1:{_closed_port()}', HF_HOME=str(tmp_path), TIMM_SAN_CACHE=str(cache))
    result = run([sys.executable, '-m', 'timm_san', 'demo', '--pretrained', '--models', MODEL], env=env)
    assert result.returncode == 0, result.stderr
    assert f'| {MODEL} | 10.5 |' in result.stdout


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
