""" ``timm-san download``: the official checkpoints from a Google Drive stand-in on 127.0.0.1, through gdown

``TIMM_SAN_DRIVE_URL`` points the real download code (gdown over HTTP) at the stand-in, which serves a checkpoint
made here in the official format. A good file ends in a folder timm loads with the line the command prints; a file
that is not a checkpoint, a truncated one, one that is cut short in transfer, one of another model, one whose
sha256 differs from the record, and a server error each end in a message naming what is wrong, with nothing left
in the cache. Most runs are in-process (seconds); one runs the installed console script as a user would.
"""
import hashlib
import json
import os
import re
import shutil
import sys
from pathlib import Path

import pytest
import timm
import torch

import timm_san  # noqa: F401
from drive_server import DriveStandIn
from hub_testing import (
    CHECK_SIZE, MODEL, assert_same_weights, checkpoint_reference, clean_env, run, write_official_checkpoint)
from timm_san.cli.download import main as download_main
from timm_san.weights.download import DRIVE_URL_ENV, SOURCE_FILE, default_cache_dir
from timm_san.weights.sources import DEFAULT_SOURCES_FILE, load_sources

FILE_ID = load_sources()[MODEL].drive_file_id
FOLDER = f'{MODEL}.orig_in1k'
CONSOLE_SCRIPT = os.path.join(os.path.dirname(sys.executable), 'timm-san')
LOAD_LINE = re.compile(r"timm\.create_model\('local-dir:([^']+)', pretrained=True\)")


@pytest.fixture(scope='module')
def checkpoint(tmp_path_factory) -> Path:
    return write_official_checkpoint(tmp_path_factory.mktemp('drive') / 'model_best.pth')


@pytest.fixture(scope='module')
def reference(checkpoint):
    return checkpoint_reference(checkpoint)


@pytest.fixture
def drive(monkeypatch, checkpoint):
    with DriveStandIn() as server:
        server.files[FILE_ID] = checkpoint.read_bytes()
        monkeypatch.setenv(DRIVE_URL_ENV, server.url_template)
        yield server


def _download(capsys, *args):
    code = download_main([MODEL, *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


def _cache_is_empty(cache: Path) -> bool:
    return not cache.exists() or not any(cache.iterdir())


def test_download_converts_prints_the_load_line_and_is_not_repeated(drive, reference, tmp_path, capsys):
    cache = tmp_path / 'cache'
    code, out, err = _download(capsys, '--cache-dir', cache)
    assert code == 0, err
    folder = cache / FOLDER
    written = ['README.md', SOURCE_FILE, 'config.json', 'model.safetensors']
    assert sorted(p.name for p in folder.iterdir()) == sorted(written)
    assert sorted(p.name for p in cache.iterdir()) == [FOLDER]  # no temporary folder left beside it
    assert drive.requests[FILE_ID] == 1
    assert '100%' in err  # gdown's progress bar
    assert f'no recorded sha256 to check against for {MODEL}' in out  # the record as shipped
    sha256 = json.loads((folder / SOURCE_FILE).read_text())['sha256']
    assert sha256 == hashlib.sha256(drive.files[FILE_ID]).hexdigest()

    # the printed line loads the official weights
    assert LOAD_LINE.findall(out) == [str(folder)]
    model = eval(LOAD_LINE.search(out).group(0), {'timm': timm}).eval()
    assert_same_weights(reference[0], model.state_dict())
    torch.set_num_threads(1)
    images = torch.randn(2, 3, CHECK_SIZE, CHECK_SIZE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(images), reference[1])
    # ... and so do the arguments printed for timm's scripts, as validate.py and train.py pass them to timm
    assert f'validate.py --model local-dir:{folder} --pretrained' in out
    assert f'train.py --device-modules timm_san --model {MODEL} --pretrained --pretrained-path ' \
           f'{folder / "model.safetensors"}' in out
    as_train = timm.create_model(MODEL, pretrained=True, num_classes=10, pretrained_cfg_overlay=dict(
        file=str(folder / 'model.safetensors'), num_classes=-1))
    assert torch.equal(as_train.conv_in.weight, reference[0]['conv_in.weight'])

    again_code, again_out, _ = _download(capsys, '--cache-dir', cache)
    assert again_code == 0
    assert drive.requests[FILE_ID] == 1  # found in the cache, nothing downloaded
    assert f'{MODEL}: found {folder}, nothing downloaded.' in again_out
    assert LOAD_LINE.findall(again_out) == [str(folder)]


def test_console_script_default_cache_under_hf_home(checkpoint, tmp_path):
    with DriveStandIn() as drive:
        drive.files[FILE_ID] = checkpoint.read_bytes()
        env = clean_env(HF_HOME=str(tmp_path / 'hf'), TIMM_SAN_DRIVE_URL=drive.url_template)
        result = run([CONSOLE_SCRIPT, 'download', MODEL], env=env)
    assert result.returncode == 0, result.stderr
    folder = tmp_path / 'hf' / 'timm-san' / FOLDER
    assert (folder / 'model.safetensors').is_file()
    assert f"timm.create_model('local-dir:{folder}', pretrained=True)" in result.stdout


def test_cache_setting(monkeypatch, tmp_path):
    from huggingface_hub import constants
    monkeypatch.delenv('TIMM_SAN_CACHE', raising=False)
    assert default_cache_dir() == Path(constants.HF_HOME) / 'timm-san'
    monkeypatch.setenv('TIMM_SAN_CACHE', str(tmp_path / 'mine'))
    assert default_cache_dir() == tmp_path / 'mine'


def _truncated(data: bytes) -> bytes:
    return data[:len(data) // 3]


@pytest.mark.parametrize('served, message', [
    (lambda data: b'', "it is empty"),
    (lambda data: bytes(range(256)) * 40, 'it is neither a torch checkpoint (zip or pickle) nor a safetensors file'),
    (lambda data: b'<!DOCTYPE html><html>Google Drive - quota exceeded</html>', 'it is a web page'),
    (_truncated, 'it is a torch checkpoint (zip) that is truncated or corrupt'),
], ids=['empty', 'random-bytes', 'html-page', 'truncated'])
def test_a_file_that_is_not_the_checkpoint_leaves_nothing(drive, tmp_path, capsys, served, message):
    drive.files[FILE_ID] = served(drive.files[FILE_ID])
    cache = tmp_path / 'cache'
    code, out, err = _download(capsys, '--cache-dir', cache)
    assert code == 1
    assert f'The file downloaded from {drive.url_template.format(id=FILE_ID)} for {MODEL} was not converted' in err
    assert message in err and f'Nothing was written to {cache}' in err
    assert 'Traceback' not in err and 'local-dir:' not in out
    assert _cache_is_empty(cache)


def test_server_error_and_cut_transfer_leave_nothing(drive, tmp_path, capsys):
    cache = tmp_path / 'cache'
    drive.status[FILE_ID] = 500
    code, _, err = _download(capsys, '--cache-dir', cache)
    assert code == 1
    assert f'{MODEL}: the download from {drive.url_template.format(id=FILE_ID)} failed: 500 Server Error' in err
    assert _cache_is_empty(cache)
    assert drive.requests[FILE_ID] == 1  # asked once: no retries

    del drive.status[FILE_ID]
    drive.cut.add(FILE_ID)
    code, _, err = _download(capsys, '--cache-dir', cache)
    assert code == 1
    assert 'failed: Download is incomplete' in err and f'Nothing was written to {cache}' in err
    assert _cache_is_empty(cache)


def test_another_models_checkpoint_is_refused(drive, tmp_path, capsys):
    other = write_official_checkpoint(tmp_path / 'other.pth', model_name='san10_patchwise')
    drive.files[FILE_ID] = other.read_bytes()
    cache = tmp_path / 'cache'
    code, _, err = _download(capsys, '--cache-dir', cache)
    assert code == 1
    assert f'does not fit {MODEL}' in err and 'It holds SAN weights: patchwise' in err
    assert _cache_is_empty(cache)


def test_recorded_sha256_is_checked(drive, tmp_path, capsys):
    record = json.loads(DEFAULT_SOURCES_FILE.read_text())
    actual = hashlib.sha256(drive.files[FILE_ID]).hexdigest()
    sources = tmp_path / 'sources.json'
    cache = tmp_path / 'cache'

    record['checkpoints'][MODEL]['sha256'] = hashlib.sha256(b'another file').hexdigest()
    sources.write_text(json.dumps(record))
    code, _, err = _download(capsys, '--cache-dir', cache, '--sources', sources)
    assert code == 1
    assert f'has sha256 {actual}, but the official {MODEL} checkpoint is recorded with' in err
    assert _cache_is_empty(cache)

    record['checkpoints'][MODEL]['sha256'] = actual
    sources.write_text(json.dumps(record))
    code, out, err = _download(capsys, '--cache-dir', cache, '--sources', sources, '--quiet')
    assert code == 0, err
    assert f'sha256 {actual} matches the record of the official {MODEL} checkpoint' in out
    assert '100%' not in err  # --quiet: no progress bar


def test_damaged_cache_folder_is_named_and_force_replaces_it(drive, tmp_path, capsys):
    cache = tmp_path / 'cache'
    assert _download(capsys, '--cache-dir', cache)[0] == 0
    weights = cache / FOLDER / 'model.safetensors'
    weights.write_bytes(weights.read_bytes()[:1000])
    code, _, err = _download(capsys, '--cache-dir', cache)
    assert code == 1
    assert f'{cache / FOLDER} is in the cache but it is not a valid safetensors file' in err
    assert '--force' in err

    code, out, err = _download(capsys, '--cache-dir', cache, '--force')
    assert code == 0, err
    assert drive.requests[FILE_ID] == 2
    assert sorted(p.name for p in cache.iterdir()) == [FOLDER]
    model = eval(LOAD_LINE.search(out).group(0), {'timm': timm})
    assert model.fc.weight.shape == (1000, 2048)


def test_without_gdown_says_how_to_install_it(drive, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, 'gdown', None)  # what Python does for a package that is not installed
    cache = tmp_path / 'cache'
    code, _, err = _download(capsys, '--cache-dir', cache)
    assert code == 1 and 'pip install "timm-san[download]"' in err
    assert _cache_is_empty(cache) and drive.requests[FILE_ID] == 0


@pytest.mark.parametrize('argv, message', [
    ([], 'name the models to download, or pass --all'),
    (['san11_pairwise'], "unknown model 'san11_pairwise'"),
])
def test_bad_arguments(argv, message, capsys):
    assert download_main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and 'san19_patchwise' in err and len(err.strip().splitlines()) == 1


def test_all_downloads_each_official_checkpoint(drive, tmp_path, capsys):
    # only san10_pairwise is served: the other five fail cleanly, and the command says so
    cache = tmp_path / 'cache'
    code = download_main(['--all', '--cache-dir', str(cache), '--quiet'])
    out, err = capsys.readouterr()
    assert code == 1
    assert sorted(p.name for p in cache.iterdir()) == [FOLDER]
    assert '5 of 6 failed: san10_patchwise, san15_pairwise, san15_patchwise, san19_pairwise, san19_patchwise' in err
    sources = load_sources()
    assert sorted(drive.requests) == sorted(source.drive_file_id for source in sources.values())
    assert LOAD_LINE.findall(out) == [str(cache / FOLDER)]


def test_folder_moves_whole(drive, tmp_path, capsys):
    """The converted folder works where it is moved (the printed path is the only thing that names it)."""
    cache = tmp_path / 'cache'
    assert _download(capsys, '--cache-dir', cache)[0] == 0
    moved = tmp_path / 'elsewhere'
    shutil.move(str(cache / FOLDER), moved)
    model = timm.create_model(f'local-dir:{moved}', pretrained=True)
    assert model.pretrained_cfg['architecture'] == MODEL
