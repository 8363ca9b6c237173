"""Checkpoints that do not fit, are cut short, or would run code: clear errors, nothing half loaded."""
import os
import pickle
import shutil

import pytest
import torch
import timm
from safetensors.torch import save_file
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


@pytest.fixture(scope='module')
def damaged(tmp_path_factory, files):
    """Damaged files of each kind, by name: (path, the words that must say what is wrong with it)."""
    root = tmp_path_factory.mktemp('damaged')
    good = files['san10_pairwise'].read_bytes()
    safetensors_path = root / 'good.safetensors'
    save_file(load_official_checkpoint(str(files['san10_pairwise']))[0], str(safetensors_path))
    weights = safetensors_path.read_bytes()
    corrupt = bytearray(weights)
    corrupt[:8] = b'\xff' * 8  # the header length
    legacy = root / 'legacy.pth'
    torch.save(torch.load(files['san10_pairwise'], weights_only=True), legacy, _use_new_zipfile_serialization=False)
    kinds = {
        'empty.pth': (b'', 'it is empty'),
        'empty.safetensors': (b'', 'it is empty'),
        'random.pth': (bytes(range(7, 256)) * 20, 'it is neither a torch checkpoint (zip or pickle) nor a safetensors'),
        'page.pth': (b'<html><body>Sign in</body></html>', 'it is a web page or other markup, not a checkpoint'),
        'truncated.pth': (good[:len(good) // 3], 'it is a torch checkpoint (zip) that is truncated or corrupt'),
        'truncated_legacy.pth': (legacy.read_bytes()[:len(legacy.read_bytes()) // 3],
                                 'it is a torch checkpoint that does not read whole: truncated or corrupt'),
        'truncated.safetensors': (weights[:len(weights) // 3], 'it is not a valid safetensors file: truncated'),
        'corrupt.safetensors': (bytes(corrupt), 'it is not a valid safetensors file: truncated or corrupt'),
    }
    paths = {}
    for name, (data, words) in kinds.items():
        (root / name).write_bytes(data)
        paths[name] = (root / name, words)
    paths['missing.pth'] = (root / 'missing.pth', 'there is no file at that path')
    return paths


DAMAGED = ['empty.pth', 'empty.safetensors', 'random.pth', 'page.pth', 'truncated.pth', 'truncated_legacy.pth',
           'truncated.safetensors', 'corrupt.safetensors', 'missing.pth']


@pytest.mark.parametrize('kind', DAMAGED)
def test_damaged_file_through_pretrained_file_names_it(damaged, kind):
    path, words = damaged[kind]
    with pytest.raises(CheckpointReadError) as info:
        timm.create_model('san10_pairwise', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    message = str(info.value)
    assert message.startswith(f"Cannot read the pretrained weights of san10_pairwise '{path}'")
    assert words in message
    assert 'Hub' not in message and 'hf-hub' not in message  # a local file is not blamed on a repository


@pytest.mark.parametrize('kind', [k for k in DAMAGED if k.endswith('.pth')])
def test_damaged_file_through_load_official_checkpoint_names_it(damaged, kind):
    path, words = damaged[kind]
    error = FileNotFoundError if kind == 'missing.pth' else CheckpointReadError
    with pytest.raises(error) as info:
        load_official_checkpoint(str(path))
    assert f"'{path}'" in str(info.value) and words in str(info.value)
    assert 'needs code' not in str(info.value)


@pytest.mark.parametrize('kind', ['empty.safetensors', 'truncated.safetensors', 'corrupt.safetensors'])
def test_damaged_local_dir_names_the_file(damaged, files, tmp_path, kind):
    from timm.models._hub import save_for_hf
    model = timm.create_model('san10_pairwise')
    save_for_hf(model, str(tmp_path), safe_serialization=True)
    shutil.copy(damaged[kind][0], tmp_path / 'model.safetensors')
    with pytest.raises(CheckpointReadError) as info:
        timm.create_model(f'local-dir:{tmp_path}', pretrained=True)
    assert f"'{tmp_path / 'model.safetensors'}'" in str(info.value) and damaged[kind][1] in str(info.value)
    assert 'timm-san download --force' in str(info.value)


@pytest.mark.parametrize('kind', DAMAGED)
def test_checkpoint_path_is_timms_and_gains_no_claim_of_ours(damaged, kind):
    # checkpoint_path= is read by timm's own loader after the model is built; timm-san adds nothing to its error
    with pytest.raises(Exception) as info:
        timm.create_model('san10_pairwise', checkpoint_path=str(damaged[kind][0]))
    assert not isinstance(info.value, (CheckpointReadError, CheckpointMismatchError))
    assert not any('timm-san' in note for note in getattr(info.value, '__notes__', ()))


@pytest.mark.parametrize('kind', ['empty.pth', 'random.pth', 'truncated.pth', 'missing.pth'])
def test_damaged_file_through_the_conversion_tool(damaged, tmp_path, capsys, kind):
    from timm_san.cli.convert import main as convert_main
    path, words = damaged[kind]
    out = tmp_path / 'out'
    assert convert_main([str(path), '--model', 'san10_pairwise', '--out', str(out), '--check-input-size', '32']) == 1
    err = capsys.readouterr().err
    assert str(path) in err
    assert (words if kind != 'missing.pth' else 'No checkpoint file at') in err
    assert not out.exists() and not list(tmp_path.glob('.out*'))


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
    with pytest.raises(CheckpointReadError, match='it is a pickle that needs code or classes beyond plain tensors'):
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
