"""Checkpoints that do not fit, are cut short, or would run code: clear errors, nothing half loaded."""
import os
import pickle

import pytest
import torch
import timm
from timm.models import load_checkpoint

import timm_san  # noqa: F401
from timm_san.weights.checkpoint import CheckpointMismatchError, CheckpointReadError, load_official_checkpoint
from reference import official_checkpoint, official_model, randomize_


@pytest.fixture(scope='module')
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp('ckpts')
    san10 = official_checkpoint(randomize_(official_model('san10_pairwise'), seed=1))
    paths = {'san10_pairwise': root / 'san10_pairwise.pth', 'san19_patchwise': root / 'san19_patchwise.pth'}
    torch.save(san10, paths['san10_pairwise'])
    torch.save(official_checkpoint(official_model('san19_patchwise')), paths['san19_patchwise'])
    resnet = timm.create_model('resnet26')
    paths['resnet26'] = root / 'resnet26.pth'
    torch.save({'state_dict': resnet.state_dict()}, paths['resnet26'])
    cut = dict(san10, state_dict={k: v for k, v in san10['state_dict'].items() if not k.startswith('module.layer3.')})
    paths['cut'] = root / 'cut.pth'
    torch.save(cut, paths['cut'])
    paths['truncated_file'] = root / 'truncated.pth'
    data = paths['san10_pairwise'].read_bytes()
    paths['truncated_file'].write_bytes(data[:len(data) // 3])
    return paths


def _all_timm_paths(name, path):
    """Each way timm loads a checkpoint file: pretrained file, checkpoint_path, load_checkpoint."""
    yield lambda: timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    yield lambda: timm.create_model(name, checkpoint_path=str(path))
    yield lambda: load_checkpoint(timm.create_model(name), str(path))


@pytest.mark.parametrize('which', [0, 1, 2])
def test_another_models_checkpoint_is_named_as_such(files, which):
    load = list(_all_timm_paths('san10_pairwise', files['resnet26']))[which]
    with pytest.raises(CheckpointMismatchError, match=r'does not fit san10_pairwise.*does not hold SAN weights'):
        load()


@pytest.mark.parametrize('which', [0, 1, 2])
def test_another_sans_checkpoint_says_which_san_it_holds(files, which):
    load = list(_all_timm_paths('san10_pairwise', files['san19_patchwise']))[which]
    with pytest.raises(CheckpointMismatchError) as info:
        load()
    message = str(info.value)
    assert 'patchwise, blocks [3, 3, 4, 6, 3] (san19_patchwise)' in message
    assert 'Missing' in message and 'Unexpected' in message and 'layer0.0.sam.conv_p.weight' in message


@pytest.mark.parametrize('which', [0, 1, 2])
def test_cut_short_checkpoint_names_the_missing_keys(files, which):
    load = list(_all_timm_paths('san10_pairwise', files['cut']))[which]
    with pytest.raises(CheckpointMismatchError, match=r'Missing \d+ key\(s\): layer3\.0\.bn1\.weight'):
        load()


def test_misfit_leaves_the_model_untouched(files):
    model = timm.create_model('san10_pairwise', num_classes=10)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state_dict = torch.load(files['san10_pairwise'], weights_only=True)['state_dict']
    with pytest.raises(CheckpointMismatchError, match=r'shape mismatch.*fc\.weight: checkpoint \[1000, 2048\]'):
        model.load_state_dict(state_dict, strict=False)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_truncated_file_is_refused_clearly(files):
    with pytest.raises(CheckpointReadError, match='truncated or not a checkpoint'):
        load_official_checkpoint(str(files['truncated_file']))
    # timm's own loader refuses it too (its message is torch's)
    with pytest.raises(RuntimeError):
        timm.create_model('san10_pairwise', checkpoint_path=str(files['truncated_file']))


def test_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match='No checkpoint file'):
        load_official_checkpoint(str(tmp_path / 'nope.pth'))


class _RunsCode:
    """Unpickling this would call os.system: a checkpoint that runs code when loaded."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f'touch {self.marker}',)


def test_pickle_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / 'code_ran'
    path = tmp_path / 'evil.pth'
    state_dict = {f'module.{k}': v for k, v in timm.create_model('san10_pairwise').state_dict().items()}
    torch.save({'state_dict': state_dict, 'payload': _RunsCode(marker)}, path, pickle_module=pickle)
    with pytest.raises(CheckpointReadError, match='Refused to load'):
        load_official_checkpoint(str(path))
    for load in _all_timm_paths('san10_pairwise', path):
        with pytest.raises(RuntimeError, match='weights_only'):
            load()
    assert not marker.exists()


def test_official_checkpoint_reads_with_its_metadata(files):
    state_dict, extra = load_official_checkpoint(str(files['san10_pairwise']))
    assert 'conv_in.weight' in state_dict and not any(k.startswith('module.') for k in state_dict)
    assert extra['epoch'] == 100 and extra['top1_val'] == pytest.approx(0.771)
    model = timm.create_model('san10_pairwise')
    model.load_state_dict(state_dict)
