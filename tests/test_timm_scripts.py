""" timm's own train.py, validate.py, inference.py and benchmark.py with SAN (only where ``TIMM_REPO`` is set)

    TIMM_REPO=/path/to/pytorch-image-models python -m pytest tests/test_timm_scripts.py

The scripts live in timm's repository, not in its wheel, so CI (which has no copy) skips this module; the launcher
itself is tested there with a stand-in script (test_launcher.py). The scripts are copied out of the checkout
before they run: run in place, their directory comes first on ``sys.path`` and the checkout's ``timm`` package
would be imported instead of the installed one, which may be an older version than timm-san needs.

Everything is small: SAN10 at 32x32 or 64x64 on CPU, batches of 2, a three-class ImageFolder made here, one epoch. The
checks compare the scripts with each other (validate.py with train.py's own evaluation), with the checkpoints
they were given, and with the model run in this process, not with fixed numbers.
"""
import csv
import json
import os
import shutil
import subprocess
import sys
from typing import Dict, List, Tuple

import numpy as np
import pytest
import torch
from PIL import Image

import timm
import timm_san  # noqa: F401  registers the SAN models
from timm.data import ImageDataset, create_transform, resolve_data_config
from timm.models import load_checkpoint

from reference import official_checkpoint, official_model, randomize_

TIMM_REPO = os.environ.get('TIMM_REPO', '')
SCRIPTS = ('train.py', 'validate.py', 'inference.py', 'benchmark.py')
MODEL = 'san10_patchwise'
IMG_SIZE = 32
# the run that validate.py and inference.py evaluate: at 32x32 (1x1 maps in the last stage, batches of 2), three
# steps leave BatchNorm statistics from which eval-mode activations overflow, and the comparisons would be of NaNs
EVAL_SIZE = 64
CLASSES = ('ant', 'bee', 'cat')

pytestmark = pytest.mark.skipif(not TIMM_REPO, reason='TIMM_REPO (a checkout of timm\'s repository) is not set')


@pytest.fixture(scope='module')
def scripts(tmp_path_factory) -> str:
    missing = [s for s in SCRIPTS if not os.path.isfile(os.path.join(TIMM_REPO, s))]
    if missing:
        pytest.fail(f'TIMM_REPO={TIMM_REPO!r} is not a checkout of timm\'s repository: no {", ".join(missing)}')
    folder = tmp_path_factory.mktemp('timm_scripts')
    for script in SCRIPTS:
        shutil.copy(os.path.join(TIMM_REPO, script), folder)
    return str(folder)


@pytest.fixture(scope='module')
def data(tmp_path_factory) -> str:
    """A three-class ImageFolder of random images of odd sizes: train/ (2 per class), validation/ (2 per class)."""
    root = tmp_path_factory.mktemp('images')
    rng = np.random.default_rng(0)
    for split in ('train', 'validation'):
        for label in CLASSES:
            os.makedirs(root / split / label)
            for i in range(2):
                pixels = rng.integers(0, 256, (40 + 3 * i, 44, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / label / f'{i}.png')
    return str(root)


@pytest.fixture(scope='module')
def official(tmp_path_factory) -> Tuple[str, Dict[str, torch.Tensor]]:
    """An official-format checkpoint (``module.`` keys, optimizer, scheduler) and its flat state dict."""
    checkpoint = official_checkpoint(randomize_(official_model(MODEL), seed=1))
    path = str(tmp_path_factory.mktemp('official') / f'{MODEL}.pth')
    torch.save(checkpoint, path)
    return path, {k[len('module.'):]: v for k, v in checkpoint['state_dict'].items()}


def _run(command: List[str], cwd: str, timeout: int = 900) -> Tuple[int, str]:
    proc = subprocess.run(
        command, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=dict(os.environ, OMP_NUM_THREADS='2'))
    return proc.returncode, proc.stdout + proc.stderr


def _train(
        scripts: str, data: str, output: str, name: str, *args: str, size: int = IMG_SIZE, launcher: bool = False,
        timeout: int = 900,
) -> Tuple[str, str]:
    """timm's train.py for one epoch with SAN; its output folder and log.

    The models are registered by ``--device-modules timm_san``, or with ``launcher`` by ``timm-san run``.
    """
    registration = ['-m', 'timm_san', 'run', os.path.join(scripts, 'train.py')] if launcher else [
        os.path.join(scripts, 'train.py'), '--device-modules', 'timm_san']
    command = [
        sys.executable, *registration, '--data-dir', data, '--model', MODEL,
        '--device', 'cpu', '--input-size', '3', str(size), str(size),
        '-b', '2', '--epochs', '1', '--workers', '0', '--seed', '0', '--log-interval', '1',
        '--output', output, '--experiment', name, *args]
    rc, log = _run(command, cwd=output, timeout=timeout)
    assert rc == 0, log
    return os.path.join(output, name), log


def _launch(scripts: str, script: str, *args: str, cwd: str, launcher: bool = True) -> Tuple[int, str]:
    prefix = [sys.executable, '-m', 'timm_san', 'run'] if launcher else [sys.executable]
    return _run([*prefix, os.path.join(scripts, script), *args], cwd=cwd)


def _summary(folder: str) -> List[Dict[str, str]]:
    with open(os.path.join(folder, 'summary.csv')) as f:
        return list(csv.DictReader(f))


def _state_dict(path: str) -> Dict[str, torch.Tensor]:
    # train.py's checkpoints hold its args (a Namespace), so they are not weights_only pickles; we wrote them
    return torch.load(path, map_location='cpu', weights_only=False)['state_dict']


def _is_weight(key: str) -> bool:
    """Parameters, not BatchNorm statistics (which a training epoch updates even at learning rate 0)."""
    return not key.endswith(('running_mean', 'running_var', 'num_batches_tracked'))


@pytest.fixture(scope='module')
def trained(scripts, data, tmp_path_factory) -> str:
    folder, _ = _train(
        scripts, data, str(tmp_path_factory.mktemp('train')), 'scratch', '--num-classes', '3', size=EVAL_SIZE)
    return folder


def test_train_from_scratch(trained):
    checkpoint = torch.load(os.path.join(trained, 'last.pth.tar'), map_location='cpu', weights_only=False)
    assert checkpoint['arch'] == MODEL and checkpoint['epoch'] == 0
    assert checkpoint['state_dict']['fc.weight'].shape == (3, 2048)
    summary = _summary(trained)
    assert [row['epoch'] for row in summary] == ['0']
    assert np.isfinite(float(summary[0]['eval_loss'])), 'evaluation after training gave NaN: nothing to compare'
    assert os.path.isfile(os.path.join(trained, 'model_best.pth.tar'))


def test_train_a_design_space_variant(scripts, data, tmp_path):
    folder, _ = _train(scripts, data, str(tmp_path), 'variant', '--num-classes', '3', '--model-kwargs',
                       'mapping_layers=3', 'kernels=(3,5,5,5,5)', size=EVAL_SIZE)
    state = torch.load(os.path.join(folder, 'last.pth.tar'), map_location='cpu', weights_only=False)['state_dict']
    # three (norm, ReLU, conv) layers: conv_w.0 to conv_w.8; stage 1's 5x5 footprint: 16 * (25 + 1) relation channels
    assert max(int(k.split('.')[4]) for k in state if k.startswith('layer0.0.sam.conv_w.')) == 8
    assert state['layer1.0.sam.conv_w.0.weight'].shape == (16 * 26,)
    assert np.isfinite(float(_summary(folder)[0]['eval_loss']))


def test_train_needs_device_modules(scripts, data, tmp_path):
    rc, log = _run([
        sys.executable, os.path.join(scripts, 'train.py'), '--data-dir', data, '--model', MODEL, '--device', 'cpu',
        '--output', str(tmp_path)], cwd=str(tmp_path))
    assert rc != 0 and f'Unknown model ({MODEL})' in log, log


def test_validate_checkpoint_written_by_train(scripts, data, trained, tmp_path):
    args = [
        '--data-dir', data, '--split', 'validation', '--model', MODEL, '--num-classes', '3', '--device', 'cpu',
        '--checkpoint', os.path.join(trained, 'model_best.pth.tar'),
        '--input-size', '3', str(EVAL_SIZE), str(EVAL_SIZE),
        '-b', '2', '--workers', '0', '--results-file', str(tmp_path / 'results.json'), '--results-format', 'json']
    rc, log = _launch(scripts, 'validate.py', *args, cwd=str(tmp_path), launcher=False)
    assert rc != 0 and f'Unknown model ({MODEL})' in log, 'validate.py should need the launcher'
    rc, log = _launch(scripts, 'validate.py', *args, cwd=str(tmp_path))
    assert rc == 0, log
    with open(tmp_path / 'results.json') as f:
        results = json.load(f)
    train_eval = _summary(trained)[-1]
    # validate.py rounds to 4 decimals
    assert results['top1'] == pytest.approx(float(train_eval['eval_top1']), abs=1e-3)
    assert results['top5'] == pytest.approx(float(train_eval['eval_top5']), abs=1e-3)
    assert results['img_size'] == EVAL_SIZE


def _logits_here(checkpoint: str, root: str) -> Dict[str, torch.Tensor]:
    """The checkpoint's logits for each image under ``root``, computed in this process with timm's eval transform."""
    model = timm.create_model(MODEL, num_classes=3)
    load_checkpoint(model, checkpoint)
    model.eval()
    transform = create_transform(**resolve_data_config({'input_size': (3, EVAL_SIZE, EVAL_SIZE)}, model=model))
    dataset = ImageDataset(root, transform=transform)
    with torch.no_grad():
        images = torch.stack([dataset[i][0] for i in range(len(dataset))])
        logits = model(images)
    return dict(zip(dataset.filenames(basename=False), logits))


def test_inference_matches_the_model(scripts, data, trained, tmp_path):
    pytest.importorskip('pandas', reason='timm\'s inference.py imports pandas')
    checkpoint = os.path.join(trained, 'model_best.pth.tar')
    root = os.path.join(data, 'validation')
    rc, log = _launch(
        scripts, 'inference.py', '--data-dir', root, '--model', MODEL, '--num-classes', '3', '--device', 'cpu',
        '--checkpoint', checkpoint, '--input-size', '3', str(EVAL_SIZE), str(EVAL_SIZE), '-b', '2', '--workers', '0',
        '--topk', '3', '--include-index', '--label-type', 'none', '--output-type', 'logit', '--fullname',
        '--results-dir', str(tmp_path), '--results-file', 'predictions.json', '--results-format', 'json',
        '--no-console-results', cwd=str(tmp_path))
    assert rc == 0, log
    with open(tmp_path / 'predictions.json') as f:
        predictions = json.load(f)
    expected = _logits_here(checkpoint, root)
    assert sorted(predictions) == sorted(expected)
    for name, logits in expected.items():
        assert torch.isfinite(logits).all(), f'{name}: the model gives non-finite logits, nothing to compare'
        top = torch.topk(logits, 3)
        assert predictions[name]['index'] == top.indices.tolist(), name
        torch.testing.assert_close(torch.tensor(predictions[name]['logit']), top.values, rtol=1e-4, atol=1e-4)


def test_benchmark(scripts, tmp_path):
    rc, log = _launch(
        scripts, 'benchmark.py', '--model', MODEL, '--device', 'cpu', '--input-size', '3', str(IMG_SIZE),
        str(IMG_SIZE), '-b', '2', '--num-warm-iter', '1', '--num-bench-iter', '5', '--bench', 'both',
        '--results-file', str(tmp_path / 'bench.json'), '--results-format', 'json', cwd=str(tmp_path))
    assert rc == 0, log
    with open(tmp_path / 'bench.json') as f:
        results = json.load(f)
    assert 'error' not in results, results
    assert results['infer_samples_per_sec'] > 0 and results['train_samples_per_sec'] > 0
    assert results['param_count'] == pytest.approx(sum(
        p.numel() for p in timm.create_model(MODEL).parameters()) / 1e6, abs=0.01)


# learning rate exactly 0 (no warmup, whose learning rate is not 0): the saved weights are the ones loaded
_FROZEN = ('--lr-base', '0', '--warmup-epochs', '0')


def test_finetune_from_official_checkpoint(scripts, data, official, tmp_path):
    path, weights = official
    folder, log = _train(
        scripts, data, str(tmp_path), 'finetune', '--pretrained', '--pretrained-path', path, '--num-classes', '3',
        *_FROZEN)
    tuned = _state_dict(os.path.join(folder, 'last.pth.tar'))
    backbone = [k for k in weights if _is_weight(k) and not k.startswith('fc.')]
    assert len(backbone) > 100
    for key in backbone:
        assert torch.equal(tuned[key], weights[key]), f'{key} not loaded from --pretrained-path'
    # the head is new: three classes, freshly initialised
    assert tuned['fc.weight'].shape == (3, 2048)
    assert not torch.equal(tuned['fc.weight'], weights['fc.weight'][:3])


def test_initial_checkpoint_official(scripts, data, official, tmp_path):
    path, weights = official
    folder, log = _train(scripts, data, str(tmp_path), 'initial', '--initial-checkpoint', path, *_FROZEN)
    assert f"Loaded state_dict from checkpoint '{path}'" in log
    loaded = _state_dict(os.path.join(folder, 'last.pth.tar'))
    assert sorted(loaded) == sorted(weights)
    for key in filter(_is_weight, weights):
        assert torch.equal(loaded[key], weights[key]), key


def test_amp_bf16_ema_grad_checkpointing_and_resume(scripts, data, tmp_path):
    features = ('--num-classes', '3', '--amp', '--amp-dtype', 'bfloat16', '--model-ema', '--grad-checkpointing')
    first, log = _train(scripts, data, str(tmp_path), 'first', *features)
    assert 'Using native Torch AMP' in log
    assert 'Test (EMA)' in log
    checkpoint = torch.load(os.path.join(first, 'last.pth.tar'), map_location='cpu', weights_only=False)
    assert checkpoint['args'].amp_dtype == 'bfloat16' and checkpoint['args'].grad_checkpointing
    assert set(checkpoint['state_dict_ema']) == set(checkpoint['state_dict'])

    resumed, log = _train(
        scripts, data, str(tmp_path), 'resumed', *features, '--resume', os.path.join(first, 'last.pth.tar'),
        '--epochs', '2')
    assert 'Restoring optimizer state from checkpoint' in log and 'Loaded state_dict_ema' in log
    assert [row['epoch'] for row in _summary(resumed)] == ['1']
    after = torch.load(os.path.join(resumed, 'last.pth.tar'), map_location='cpu', weights_only=False)
    assert after['epoch'] == 1
    assert any(not torch.equal(after['state_dict'][k], checkpoint['state_dict'][k]) for k in checkpoint['state_dict'])


def test_paper_recipe_flags(scripts, data, tmp_path):
    # docs/training.md's ImageNet command, scaled down: its optimizer and schedule flags as they are; through the
    # launcher (no --device-modules), which docs/training.md says works for train.py too
    recipe = (
        '--num-classes', '3', '--sched', 'cosine', '--warmup-epochs', '0', '--cooldown-epochs', '0', '--min-lr', '0',
        '--opt', 'momentum', '--momentum', '0.9', '--lr-base', '0.1', '--lr-base-size', '256',
        '--lr-base-scale', 'linear', '--weight-decay', '1e-4', '--opt-kwargs', 'filter_bias_and_bn=False',
        '--smoothing', '0.1', '--scale', '0.08', '1.0', '--hflip', '0.5', '--color-jitter', '0',
        '--train-interpolation', 'bilinear')
    folder, log = _train(scripts, data, str(tmp_path), 'recipe', *recipe, launcher=True)
    assert 'criterion=LabelSmoothingCrossEntropy' in log
    optimizer = torch.load(os.path.join(folder, 'last.pth.tar'), map_location='cpu', weights_only=False)['optimizer']
    # SGD without Nesterov, weight decay on every parameter (one group), 0.1 scaled to the global batch of 2
    groups = optimizer['param_groups']
    assert len(groups) == 1 and groups[0]['weight_decay'] == 1e-4
    assert groups[0]['momentum'] == 0.9 and groups[0]['nesterov'] is False
    assert groups[0]['initial_lr'] == pytest.approx(0.1 * 2 / 256)
    assert len(groups[0]['params']) == len(list(timm.create_model(MODEL, num_classes=3).parameters()))


def test_torchcompile(scripts, data, tmp_path):
    # training step and evaluation (train.py compiles the model it validates with, too): the attention operators
    # are opaque calls inside the compiled graphs; on 2 CPU cores the first step compiles in about 30 s
    folder, log = _train(
        scripts, data, str(tmp_path), 'compiled', '--num-classes', '3', '--torchcompile', size=EVAL_SIZE, timeout=600)
    assert 'Compiling task components with backend=inductor' in log
    assert [row['epoch'] for row in _summary(folder)] == ['0']
