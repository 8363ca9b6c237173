"""The 1x1 conv, 2x2 max-pool and stem operators: CPU kernels against PyTorch's own layers, forward and backward.

Each has kernels on both CPU backends (``cpp`` and ``cpu``), tested in turn through the ``backend`` fixture."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import timm

import timm_san  # noqa: F401
from timm_san import ops
from timm_san.kernels.cpu import conv1x1 as cpu_conv1x1
from module_compare import assert_buffers_close, assert_grads_close
from reference import randomize_


def _rand(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# maps large enough for each backend's own products, and small ones, which both hand to oneDNN's conv
@pytest.mark.parametrize('size', [(24, 16), (3, 4)])
@pytest.mark.parametrize('bias', [True, False])
def test_conv1x1_forward_and_backward_equal_conv2d(size, bias, kernels_run, backend):
    x = _rand(3, 8, *size, seed=1)
    weight, b = _rand(5, 8, 1, 1, seed=2), _rand(5, seed=3) if bias else None
    upstream = _rand(3, 5, *size, seed=5)
    leaves = [t.clone().requires_grad_() for t in (x, weight, b) if t is not None]
    reference = [t.detach().clone().requires_grad_() for t in leaves]
    out = ops.conv1x1(*leaves)
    expected = F.conv2d(*reference)
    assert dict(kernels_run('')) == {'conv1x1': backend}
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    out.backward(upstream), expected.backward(upstream)
    assert dict(kernels_run('')) == {'conv1x1_backward': backend}
    for got, want in zip(leaves, reference):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-12, atol=1e-12)


def test_conv1x1_gradcheck():
    x = _rand(2, 3, 10, 10, seed=6).requires_grad_()
    weight, bias = _rand(4, 3, 1, 1, seed=7).requires_grad_(), _rand(4, seed=8).requires_grad_()
    assert torch.autograd.gradcheck(ops.conv1x1, (x, weight, bias), fast_mode=True)


def test_conv1x1_kernel_input_gradient_only_when_asked():
    x, weight = _rand(2, 3, 10, 10, seed=10), _rand(4, 3, 1, 1, seed=11)
    grad = _rand(2, 4, 10, 10, seed=12)
    grad_x, grad_w, grad_b = cpu_conv1x1.conv1x1_backward(grad, x, weight, input_grad=False)
    assert grad_x is None
    torch.testing.assert_close(grad_w, torch.nn.grad.conv2d_weight(x, weight.shape, grad), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad_b, grad.sum((0, 2, 3)), rtol=1e-12, atol=1e-12)


def test_half_precision_training_keeps_the_reference_conv_backward(kernels_run):
    # the matmul weight gradient sums samples in the tensors' dtype: bf16 takes PyTorch's own backward
    x = _rand(2, 3, 10, 10, seed=13, dtype=torch.bfloat16).requires_grad_()
    weight = _rand(4, 3, 1, 1, seed=14, dtype=torch.bfloat16).requires_grad_()
    ops.conv1x1(x, weight).sum().backward()
    assert dict(kernels_run(''))['conv1x1_backward'] == 'reference'


@pytest.mark.parametrize('size', [(8, 8), (9, 7)])
def test_max_pool2x2_equals_max_pool2d(size, kernels_run, backend):
    x = _rand(2, 3, *size, seed=15)
    x[0, 0, 0, :2] = x[0, 0, 1, 0] = 5.0  # a three-way tie: the first winner takes the gradient
    x[1, 2, 2, 3] = float('nan')  # a NaN wins its window, as in MaxPool2d
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    out, expected = ops.max_pool2x2(xa), F.max_pool2d(xb, 2, 2)
    assert dict(kernels_run('')) == {'max_pool2x2': backend}
    torch.testing.assert_close(out, expected, rtol=0, atol=0, equal_nan=True)
    upstream = _rand(*out.shape, seed=16)
    out.backward(upstream), expected.backward(upstream)
    torch.testing.assert_close(xa.grad, xb.grad, rtol=0, atol=0)
    # flat maps: every window a four-way tie
    flat = torch.zeros(1, 2, *size, dtype=torch.float64)
    a, b = flat.clone().requires_grad_(), flat.clone().requires_grad_()
    ops.max_pool2x2(a).sum().backward()
    F.max_pool2d(b, 2, 2).sum().backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0)


def _stem_pair(seed: int, **kwargs):
    """(a SAN10 whose forward runs the stem operator, its stem as PyTorch's own modules)."""
    model = randomize_(timm.create_model('san10_patchwise', num_classes=10, **kwargs), seed=seed).double()
    modules = copy.deepcopy(nn.Sequential(model.conv_in, model.bn_in, model.act_in, nn.MaxPool2d(2, 2)))
    return model, modules


@pytest.mark.parametrize('size', [(8, 8), (9, 7)])
@pytest.mark.parametrize('train', [False, True])
def test_stem_equals_conv_bn_relu_pool(size, train, kernels_run, backend):
    model, modules = _stem_pair(seed=16)
    model.train(train), modules.train(train)
    with torch.no_grad():
        model.bn_in.weight[:4].neg_(), modules[1].weight[:4].neg_()  # negative scales: the pool sees normalised values
    x = _rand(2, 3, *size, seed=17)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    out, expected = model._stem_pool(xa), modules(xb)
    assert dict(kernels_run(''))['stem'] == backend
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)
    upstream = _rand(*out.shape, seed=18)
    out.backward(upstream), expected.backward(upstream)
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-9, atol=1e-12)
    for name, p in (('weight', model.conv_in.weight), ('bn weight', model.bn_in.weight), ('bn bias', model.bn_in.bias)):
        want = {'weight': modules[0].weight, 'bn weight': modules[1].weight, 'bn bias': modules[1].bias}[name]
        torch.testing.assert_close(p.grad, want.grad, rtol=1e-9, atol=1e-12, msg=name)
    for got, want in zip(model.bn_in.buffers(), modules[1].buffers()):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_stem_ties_on_flat_images_take_the_first_winner(backend):
    model, modules = _stem_pair(seed=19)
    x = torch.zeros(2, 3, 8, 8, dtype=torch.float64)
    x[0, :, :4] = 1.0  # flat regions: every window is a tie
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    model._stem_pool(xa).square().sum().backward(), modules(xb).square().sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize('kernels', ['cpp', 'cpu', 'reference'])
def test_stem_gradcheck(kernels):
    model, _ = _stem_pair(seed=20)
    bn = model.bn_in

    def stem(x, weight, bn_weight, bn_bias):
        return ops.stem(x, weight, None, bn_weight, bn_bias, None, None, bn.eps, True)[0]

    inputs = [_rand(2, 3, 4, 6, seed=21).requires_grad_()] + [
        t.detach().clone().requires_grad_() for t in (model.conv_in.weight, bn.weight, bn.bias)]
    with ops.use_kernels(kernels):
        assert torch.autograd.gradcheck(stem, inputs, fast_mode=True, atol=1e-6)


def test_model_training_step_runs_the_cpu_kernels_and_matches_the_reference(kernels_run, backend):
    model = randomize_(timm.create_model('san10_pairwise', num_classes=10), seed=22).double().train()
    reference = copy.deepcopy(model)
    x = _rand(2, 3, 64, 64, seed=23)
    torch.manual_seed(0)
    out = model(x)
    assert set(dict(kernels_run('')).values()) == {backend}
    with ops.use_kernels('reference'):
        torch.manual_seed(0)
        expected = reference(x)
        out.square().mean().backward(), expected.square().mean().backward()
    torch.testing.assert_close(out, expected, rtol=1e-9, atol=1e-12)
    assert_grads_close(model, reference, rtol=1e-8, atol=1e-11)
    assert_buffers_close(model, reference, rtol=1e-10, atol=1e-12)
