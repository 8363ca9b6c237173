"""Whole-network parity with the official release: official-format checkpoints through every timm path."""
import pytest
import torch
import timm
from timm.models import load_checkpoint

import timm_san  # noqa: F401
from reference import official_checkpoint, official_model, randomize_, repeated_reflect_pad

RTOL = 1e-4


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    assert torch.isfinite(b).all()
    return float((a - b).abs().max() / b.abs().max())


@pytest.fixture(scope='module', params=['san10_pairwise', 'san10_patchwise'])
def official(request, tmp_path_factory):
    """(name, official reference model with random weights and BN stats, path of its official checkpoint)."""
    name = request.param
    ref = randomize_(official_model(name), seed=7).eval()
    path = tmp_path_factory.mktemp('ckpt') / f'{name}_official.pth'
    torch.save(official_checkpoint(ref), path)
    return name, ref, str(path)


def _input(size, seed=0, batch=2):
    h, w = (size, size) if isinstance(size, int) else size
    return torch.randn(batch, 3, h, w, generator=torch.Generator().manual_seed(seed))


def test_loads_through_pretrained_file_and_matches_in_eval(official):
    name, ref, path = official
    model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=path)).eval()
    x = _input(128)
    with torch.no_grad():
        assert _rel_err(model(x), ref(x)) < RTOL


def test_loads_through_checkpoint_path_and_timm_load_checkpoint(official):
    name, ref, path = official
    x = _input(128, seed=1)
    with torch.no_grad():
        expected = ref(x)
        model = timm.create_model(name, checkpoint_path=path).eval()
        assert _rel_err(model(x), expected) < RTOL
        # train.py --initial-checkpoint and validate.py --checkpoint go through timm.models.load_checkpoint
        model = timm.create_model(name).eval()
        load_checkpoint(model, path)
        assert _rel_err(model(x), expected) < RTOL


def test_raw_official_state_dict_loads_into_model_as_is(official):
    name, ref, path = official
    raw = torch.load(path, weights_only=True)['state_dict']
    assert all(k.startswith('module.') for k in raw)
    model = timm.create_model(name).eval()
    model.load_state_dict(raw)
    x = _input(128, seed=2)
    with torch.no_grad():
        assert _rel_err(model(x), ref(x)) < RTOL


def test_train_mode_forward_and_running_stats_match(official):
    name, ref, path = official
    ref_train = randomize_(official_model(name), seed=7).train()
    model = timm.create_model(name, checkpoint_path=path).train()
    x = _input(128, seed=3)
    assert _rel_err(model(x), ref_train(x)) < RTOL
    ours = dict(model.named_buffers())
    for key, value in ref_train.named_buffers():
        if key.endswith('running_mean') or key.endswith('running_var'):
            assert torch.allclose(ours[key], value, rtol=1e-4, atol=1e-5), key


def test_backward_matches_in_float64(official):
    name, ref, path = official
    ref64 = randomize_(official_model(name), seed=7).double().train()
    model = timm.create_model(name, checkpoint_path=path).double().train()
    x = _input(128, seed=4).double()
    ref64(x).square().mean().backward()
    model(x).square().mean().backward()
    ref_grads = {k: p.grad for k, p in ref64.named_parameters()}
    for key, p in model.named_parameters():
        assert torch.allclose(p.grad, ref_grads[key], rtol=1e-6, atol=1e-9), key


@pytest.mark.parametrize('size', [224, (160, 192)])
def test_matches_at_official_sizes(official, size):
    name, ref, path = official
    model = timm.create_model(name, checkpoint_path=path).eval()
    x = _input(size, seed=5, batch=1)
    with torch.no_grad():
        assert _rel_err(model(x), ref(x)) < RTOL


@pytest.mark.parametrize('size', [96, 32, (97, 131), (33, 64)])
def test_small_inputs_follow_the_documented_repeated_reflection(official, size):
    name, ref, path = official
    # the official kernels read out of bounds at these sizes (ReflectionPad2d refuses the padding)
    with pytest.raises(RuntimeError):
        with torch.no_grad():
            ref(_input(size, batch=1))
    small_ref = official_model(name, pad_fn=repeated_reflect_pad).eval()
    small_ref.load_state_dict(ref.state_dict())
    model = timm.create_model(name, checkpoint_path=path).eval()
    x = _input(size, seed=6, batch=1)
    with torch.no_grad():
        assert _rel_err(model(x), small_ref(x)) < RTOL


@pytest.mark.parametrize('name', ['san15_pairwise', 'san19_patchwise'])
def test_deeper_models_match(name, tmp_path):
    ref = randomize_(official_model(name), seed=11).eval()
    path = tmp_path / 'official.pth'
    torch.save(official_checkpoint(ref), path)
    model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path))).eval()
    x = _input(128, seed=8, batch=1)
    with torch.no_grad():
        assert _rel_err(model(x), ref(x)) < RTOL
