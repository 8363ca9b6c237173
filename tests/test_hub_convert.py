""" hub/convert.py: an official checkpoint in, a folder timm loads (local-dir:) and a model card out; bad input
refused with a clear message and nothing left behind
"""
import hashlib
import json

import pytest
import timm
import torch

import timm_san  # noqa: F401
from hub_testing import (
    CHECK_SIZE, HUB_DIR, MODEL, REPO_ID, assert_same_weights, checkpoint_reference, convert, shared_conversion)
from timm_san.weights.hub_ids import hf_hub_id
from timm_san.weights.sources import DEFAULT_SOURCES_FILE, SourceRecordError, load_sources, record_sha256


@pytest.fixture(scope='module')
def conversion(tmp_path_factory):
    return shared_conversion(tmp_path_factory)


def _leftovers(parent, name):
    return [p.name for p in parent.iterdir() if p.name.startswith(f'.{name}')]


def test_default_cfgs_name_hub_repositories():
    for name in ('san10_pairwise', 'san10_patchwise', 'san15_pairwise', 'san15_patchwise', 'san19_pairwise',
                 'san19_patchwise'):
        cfg = timm.models.get_pretrained_cfg(name)
        assert cfg.hf_hub_id == hf_hub_id(f'{name}.orig_in1k')
        assert cfg.hf_hub_id.endswith(f'/{name}.orig_in1k')


def test_convert_writes_a_folder_timm_loads(conversion):
    checkpoint, folder, result = conversion
    assert sorted(p.name for p in folder.iterdir()) == ['README.md', 'config.json', 'model.safetensors']
    sha256 = hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    assert f'sha256 {sha256} matches the record of the official {MODEL} checkpoint' in result.stdout
    assert not _leftovers(folder.parent, folder.name)

    config = json.loads((folder / 'config.json').read_text())
    assert config['architecture'] == MODEL
    assert config['pretrained_cfg']['tag'] == 'orig_in1k'
    assert config['num_classes'] == 1000

    # the loader timm itself uses for a local folder, checked against the checkpoint loaded directly
    model = timm.create_model(f'local-dir:{folder}', pretrained=True).eval()
    expected_weights, expected_logits = checkpoint_reference(checkpoint)
    assert_same_weights(expected_weights, model.state_dict())
    torch.set_num_threads(1)
    images = torch.randn(2, 3, CHECK_SIZE, CHECK_SIZE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(images), expected_logits)


def test_model_card(conversion):
    checkpoint, folder, _ = conversion
    card = (folder / 'README.md').read_text()
    metadata = card.split('---\n')[1]
    for line in ('library_name: timm', 'license: mit', '- image-classification', '- timm', '- imagenet-1k'):
        assert line in metadata.splitlines(), line
    assert f"timm.create_model('hf-hub:{REPO_ID}', pretrained=True)" in card
    assert f'| **{MODEL}** | 74.9 | 92.1 | 10.5 | 2.2 |' in card
    assert '@inproceedings{zhao2020exploring' in card
    assert hashlib.sha256(checkpoint.read_bytes()).hexdigest() in card
    assert 'https://drive.google.com/open?id=19ZJn48UpiF_j8e1-UU9UZ4AVfLjmwPzH' in card
    assert f'https://drive.google.com/file/d/{DRIVE_FILE_IDS[MODEL]}/view' in card
    assert 'epoch 100, top1_val 0.771, top5_val 0.935' in card


def test_refuses_checkpoint_of_another_model(tmp_path, conversion):
    checkpoint, _, _ = conversion
    out = tmp_path / 'out'
    result = convert(checkpoint, out, model='san10_patchwise')
    assert result.returncode == 1
    assert 'no recorded sha256 to check against for san10_patchwise' in result.stdout  # the record as shipped
    assert 'does not fit san10_patchwise' in result.stderr
    assert 'It holds SAN weights: pairwise' in result.stderr
    assert not out.exists() and not _leftovers(tmp_path, 'out')


def test_refuses_truncated_checkpoint(tmp_path, conversion):
    checkpoint, _, _ = conversion
    truncated = tmp_path / 'model_best.pth'
    truncated.write_bytes(checkpoint.read_bytes()[:1_000_000])
    out = tmp_path / 'out'
    result = convert(truncated, out)
    assert result.returncode == 1
    assert f"Cannot read the checkpoint '{truncated}'" in result.stderr
    assert 'it is a torch checkpoint (zip) that is truncated or corrupt' in result.stderr
    assert not out.exists() and not _leftovers(tmp_path, 'out')


def test_checks_the_recorded_sha256(tmp_path, conversion):
    checkpoint, _, _ = conversion
    record = json.loads((HUB_DIR / 'official_checkpoints.json').read_text())
    actual = hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    wrong = hashlib.sha256(b'another file').hexdigest()
    record['checkpoints'][MODEL]['sha256'] = wrong
    sources = tmp_path / 'sources.json'
    sources.write_text(json.dumps(record))
    out = tmp_path / 'out'

    result = convert(checkpoint, out, '--sources', str(sources))
    assert result.returncode == 1
    assert f'has sha256 {actual}' in result.stderr and f'recorded with {wrong}' in result.stderr
    assert '--ignore-sha256' in result.stderr
    assert not out.exists() and not _leftovers(tmp_path, 'out')

    # told to, it converts anyway, and replaces a folder already there as a whole
    out.mkdir()
    (out / 'stale.txt').write_text('from an earlier conversion')
    result = convert(checkpoint, out, '--sources', str(sources), '--ignore-sha256', '--overwrite')
    assert result.returncode == 0, result.stderr
    assert 'Converting anyway (--ignore-sha256)' in result.stdout
    assert sorted(p.name for p in out.iterdir()) == ['README.md', 'config.json', 'model.safetensors']
    assert not _leftovers(tmp_path, 'out')


def test_refuses_existing_folder_and_unknown_model(tmp_path, conversion):
    checkpoint, folder, _ = conversion
    before = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    result = convert(checkpoint, folder)
    assert result.returncode == 1 and 'already exists' in result.stderr and '--overwrite' in result.stderr
    assert before == {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}

    result = convert(checkpoint, tmp_path / 'out', model='san11_pairwise')
    assert result.returncode == 1 and "Unknown model 'san11_pairwise'" in result.stderr
    assert not (tmp_path / 'out').exists()


# the Google Drive file ids of the public release (its folder 19ZJn48UpiF_j8e1-UU9UZ4AVfLjmwPzH)
DRIVE_FILE_IDS = {
    'san10_pairwise': '1lv5TYfJFYvNWt_Ik0E-nAuI5h4PqSwuk',
    'san10_patchwise': '1aU60a3I-YZK1HYs25sj2V5nbXC9FqRZ5',
    'san15_pairwise': '1yfJnq28XYAjJ4ThYd9kv9MFBKFvzCr4I',
    'san15_patchwise': '1MJwkzyo2wxjSCynj-Jp8NQMSj6o89Ph-',
    'san19_pairwise': '1wAaGSizflxOCSiVHh2EE3mtyGL0IuPK9',
    'san19_patchwise': '1rtYIB-fTkDc4HR5s8K9Ddn2Xae-lhsfb',
}


def test_official_sources_record_is_honest():
    sources = load_sources()
    assert sorted(sources) == sorted(timm.list_models('san*'))
    assert {name: source.drive_file_id for name, source in sources.items()} == DRIVE_FILE_IDS
    for source in sources.values():
        assert source.release_folder == 'https://drive.google.com/open?id=19ZJn48UpiF_j8e1-UU9UZ4AVfLjmwPzH'
        assert source.sha256 is None or len(source.sha256) == 64
    # hub/ holds the record too (a link to the package's copy, which installs with the package)
    assert load_sources(HUB_DIR / 'official_checkpoints.json') == sources


def test_record_sha256_writes_once_and_keeps_the_layout(tmp_path):
    record = tmp_path / 'record.json'
    record.write_text(DEFAULT_SOURCES_FILE.read_text())
    link = tmp_path / 'link.json'
    link.symlink_to(record)
    sha256 = hashlib.sha256(b'x').hexdigest()
    assert record_sha256(MODEL, sha256, link)
    assert link.is_symlink()  # written through the link, not over it
    assert load_sources(record)[MODEL].sha256 == sha256
    changed = [line for line in record.read_text().splitlines()
               if line not in DEFAULT_SOURCES_FILE.read_text().splitlines()]
    assert len(changed) == 1 and MODEL in changed[0]  # one line per checkpoint: the diff names the one recorded
    assert not record_sha256(MODEL, sha256, record)
    with pytest.raises(SourceRecordError, match='already records sha256'):
        record_sha256(MODEL, hashlib.sha256(b'y').hexdigest(), record)
