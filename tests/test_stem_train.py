"""The training stem (``timm_san.stem_train``) against conv, BatchNorm, ReLU and max-pool as modules."""
import pytest
import torch
import torch.nn as nn

import timm_san  # noqa: F401
from timm_san import san as san_module
from timm_san.stem_train import _PooledStemTrainFn, pooled_stem_train, stem_train_supported
from module_compare import assert_buffers_close, assert_grads_close
from reference import randomize_


def _rand(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _stem(seed: int, dtype: torch.dtype, momentum) -> nn.Sequential:
    stem = nn.Sequential(
        nn.Conv2d(3, 8, 1, bias=False), nn.BatchNorm2d(8, momentum=momentum), nn.ReLU(inplace=True), nn.MaxPool2d(2))
    randomize_(stem, seed=seed)
    with torch.no_grad():
        stem[1].weight.uniform_(-1.5, 1.5, generator=torch.Generator().manual_seed(seed))  # negative scales too
    return stem.to(dtype).train()


def _images(batch: int, size, seed: int, dtype: torch.dtype) -> torch.Tensor:
    x = _rand(batch, 3, *size, seed=seed, dtype=dtype) * 2 + 0.5
    # flat regions, as images have them: every 2x2 window there is a tie, which the max-pool breaks by scan order
    x[:, :, 2:6, 2:6] = x[:, :, 2:3, 2:3]
    return x


@pytest.mark.parametrize('size', [(8, 8), (9, 7)])  # (9, 7): the pool drops a row and a column
@pytest.mark.parametrize('momentum', [0.1, None])
def test_pooled_stem_train_equals_module_path(size, momentum):
    fused, plain = _stem(0, torch.float64, momentum), _stem(0, torch.float64, momentum)
    for step in range(2):  # the running statistics move twice
        x = _images(3, size, seed=step + 1, dtype=torch.float64)
        x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
        out = pooled_stem_train(x1, fused[0], fused[1])
        expected = plain(x2)
        torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
        upstream = _rand(*expected.shape, seed=10 + step)
        out.backward(upstream), expected.backward(upstream)
        torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-10, atol=1e-12)
    assert_grads_close(fused, plain, rtol=1e-10, atol=1e-12)
    assert_buffers_close(fused, plain, rtol=1e-12, atol=1e-12)


def test_pooled_stem_train_in_float32_is_as_accurate_as_the_modules():
    # at image size the float32 rounding of the module path itself shows: both are measured against float64
    x = _images(4, (96, 96), seed=2, dtype=torch.float64)
    upstream = _rand(4, 8, 48, 48, seed=3)
    truth = _stem(1, torch.float64, 0.1)
    truth(x).backward(upstream)
    fused, plain = _stem(1, torch.float32, 0.1), _stem(1, torch.float32, 0.1)
    outs = [pooled_stem_train(x.float(), fused[0], fused[1]), plain(x.float())]
    for out in outs:
        out.backward(upstream.float())
    expected = dict(truth.named_parameters())
    for (name, p), q in zip(fused.named_parameters(), plain.parameters()):
        error, plain_error = [(t.grad.double() - expected[name].grad).abs().max() for t in (p, q)]
        assert error <= 2 * plain_error + 1e-6 * expected[name].grad.abs().max(), name
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)
    assert_buffers_close(fused, plain, rtol=1e-5, atol=1e-6)


def test_pooled_stem_train_gradcheck():
    weight = _rand(4, 3, 1, 1, seed=4).requires_grad_()
    bn_weight = (torch.rand(4, dtype=torch.float64, generator=torch.Generator().manual_seed(5)) - 0.3).requires_grad_()
    bn_bias = _rand(4, seed=6).requires_grad_()
    x = _rand(2, 3, 5, 6, seed=7).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda *args: _PooledStemTrainFn.apply(args[0], 1e-5, *args[1:])[0], (x, weight, bn_weight, bn_bias))


@pytest.mark.parametrize('name', ['san10_pairwise', 'san10_patchwise'])
def test_model_training_takes_the_stem_and_matches_the_module_path(name, monkeypatch):
    calls = []
    monkeypatch.setattr(
        san_module, 'pooled_stem_train', lambda *a, _f=san_module.pooled_stem_train: calls.append(1) or _f(*a))
    fused = randomize_(san_module.SAN(name.split('_')[1], layers=(1, 1, 1, 1, 1), num_classes=10), seed=8).double()
    plain = san_module.SAN(name.split('_')[1], layers=(1, 1, 1, 1, 1), num_classes=10).double()
    plain.load_state_dict(fused.state_dict())
    plain.fused = False  # the module stem; the blocks stay as in the fused model
    x = _images(2, (64, 64), seed=9, dtype=torch.float64)
    out, expected = fused(x), plain(x)
    assert calls == [1]
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)
    out.square().mean().backward(), expected.square().mean().backward()
    assert_grads_close(fused, plain, rtol=1e-9, atol=1e-12)
    assert_buffers_close(fused, plain, rtol=1e-10, atol=1e-12)


def test_stem_train_steps_aside_where_the_modules_differ():
    x = _rand(2, 3, 8, 8)
    stem = _stem(0, torch.float64, 0.1)
    assert stem_train_supported(x, *stem)
    assert not stem_train_supported(x.half(), *stem)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        assert not stem_train_supported(x, *stem)
    stem[1].eval()  # a frozen BatchNorm normalises with its running statistics
    assert not stem_train_supported(x, *stem)
    stem[1].train()
    handle = stem[1].register_forward_hook(lambda *args: None)
    assert not stem_train_supported(x, *stem)
    handle.remove()
    biased = nn.Conv2d(3, 8, 1, bias=True).double()
    assert not stem_train_supported(x, biased, *stem[1:])
    assert not stem_train_supported(x, stem[0], nn.BatchNorm2d(8, affine=False).double(), *stem[2:])
    assert not stem_train_supported(x, *stem[:3], nn.MaxPool2d(3, 2))
    assert not stem_train_supported(x, stem[0], stem[1], nn.GELU(), stem[3])


def test_model_with_a_frozen_stem_norm_takes_the_module_path(monkeypatch):
    calls = []
    monkeypatch.setattr(
        san_module, 'pooled_stem_train', lambda *a, _f=san_module.pooled_stem_train: calls.append(1) or _f(*a))
    model = san_module.SAN('pairwise', layers=(1, 1, 1, 1, 1), num_classes=10).train()
    model.bn_in.eval()
    running_mean = model.bn_in.running_mean.clone()
    model(torch.randn(2, 3, 32, 32))
    assert calls == [] and torch.equal(model.bn_in.running_mean, running_mean)
    model.bn_in.train()
    model(torch.randn(2, 3, 32, 32))
    assert calls == [1] and not torch.equal(model.bn_in.running_mean, running_mean)
