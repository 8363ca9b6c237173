"""The training-mode attention operators against the plain operators and the official network."""
import copy

import pytest
import torch
import torch.nn as nn
import timm

import timm_san  # noqa: F401
from timm_san import ops_train
from timm_san.sam import SelfAttention
from module_compare import assert_buffers_close, assert_grads_close
from reference import official_model, randomize_, repeated_reflect_pad

FUSED_NODE = {'pairwise': '_PairwiseAttentionTrainFnBackward', 'patchwise': '_PatchwiseAttentionTrainFnBackward'}
SA_TYPES = ['pairwise', 'patchwise']


def _rand(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _pair(sa_type: str, planes: int, kernel_size: int, seed: int = 0):
    """(module taking the fused training path, the same module on the plain operators)."""
    fused = SelfAttention(sa_type, planes, planes // 16, planes // 4, share_planes=8, kernel_size=kernel_size)
    fused = randomize_(fused, seed=seed).double().train()
    plain = copy.deepcopy(fused)
    plain.recompute = False
    return fused, plain


def _graph_names(out: torch.Tensor):
    names, stack, seen = [], [out.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.append(node.name())
        stack.extend(next_node for next_node, _ in node.next_functions)
    return names


def _fused_taken(out: torch.Tensor) -> bool:
    names = _graph_names(out)
    return any(node in names for node in FUSED_NODE.values())


def _assert_step_equal(fused: nn.Module, plain: nn.Module, x: torch.Tensor, seed: int) -> None:
    """One training step (forward, backward) of both modules: outputs, gradients and buffers agree."""
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_fused, out_plain = fused(xa), plain(xb)
    assert FUSED_NODE[fused.sa_type] in _graph_names(out_fused) and not _fused_taken(out_plain)
    torch.testing.assert_close(out_fused, out_plain, rtol=1e-10, atol=1e-12)
    upstream = _rand(*out_plain.shape, seed=seed)
    out_fused.backward(upstream), out_plain.backward(upstream)
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-10, atol=1e-12)
    assert_grads_close(fused, plain, rtol=1e-10, atol=1e-12)
    assert_buffers_close(fused, plain, rtol=1e-12, atol=1e-14)
    fused.zero_grad(), plain.zero_grad()


@pytest.fixture(params=['default', 'rows-1', 'rows-2', 'samples-2'])
def chunking(request, monkeypatch):
    """The operators' own chunking, and forced chunks: one or two footprint rows of one sample, two samples."""
    if request.param == 'default':
        return
    samples, rows = {'rows-1': (1, 1), 'rows-2': (1, 2), 'samples-2': (2, 99)}[request.param]
    monkeypatch.setattr(ops_train, 'offset_chunks', lambda batch, planes, k, spatial, elements: (
        min(samples, batch), min(rows, k)))
    monkeypatch.setattr(ops_train, '_BLOCK_ELEMENTS', 1)


@pytest.mark.parametrize('sa_type', SA_TYPES)
@pytest.mark.parametrize('planes,kernel_size,size', [
    (32, 3, (9, 10)), (64, 7, (9, 10)), (32, 7, (5, 5)), (64, 7, (3, 2)), (32, 3, (1, 1)),
    (256, 7, (32, 33)),  # large enough maps for the shifted-add scatter (not col2im)
])
def test_two_training_steps_equal_the_plain_operators(sa_type, planes, kernel_size, size, chunking):
    fused, plain = _pair(sa_type, planes, kernel_size)
    for step in range(2):
        x = _rand(3, planes, *size, seed=10 + step)
        _assert_step_equal(fused, plain, x, seed=20 + step)
    assert fused.conv_w[0].num_batches_tracked.item() == 12345 + 2


@pytest.mark.parametrize('sa_type', SA_TYPES)
def test_cumulative_average_non_affine_bn_and_biases_as_the_plain_operators(sa_type):
    fused, _ = _pair(sa_type, 64, 7, seed=3)
    # module surgery the operators still take: other BatchNorm options, biases added or removed
    mapping_in, hidden = fused.conv_w[2].in_channels, fused.conv_w[2].out_channels
    fused.conv_w[0] = nn.BatchNorm2d(mapping_in, momentum=None, affine=False).double()
    fused.conv_w[2] = nn.Conv2d(mapping_in, hidden, 1, bias=True).double()
    fused.conv_w[5] = nn.Conv2d(hidden, fused.conv_w[5].out_channels, 1, bias=False).double()
    fused.conv1 = nn.Conv2d(64, fused.conv1.out_channels, 1, bias=False).double()
    randomize_(fused, seed=4)
    plain = copy.deepcopy(fused)
    plain.recompute = False
    for step in range(2):
        _assert_step_equal(fused, plain, _rand(2, 64, 6, 7, seed=30 + step), seed=40 + step)


@pytest.mark.parametrize('sa_type', SA_TYPES)
def test_channels_last_input_and_module(sa_type):
    fused, plain = _pair(sa_type, 64, 7, seed=11)
    fused, plain = fused.to(memory_format=torch.channels_last), plain.to(memory_format=torch.channels_last)
    _assert_step_equal(fused, plain, _rand(2, 64, 9, 10, seed=12).to(memory_format=torch.channels_last), seed=13)


@pytest.mark.parametrize('sa_type', SA_TYPES)
def test_float32_stays_close_to_the_plain_operators(sa_type):
    fused, plain = _pair(sa_type, 64, 7, seed=5)
    fused, plain = fused.float(), plain.float()
    x = _rand(2, 64, 12, 11, seed=6, dtype=torch.float32) * 3 + 1
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_fused, out_plain = fused(xa), plain(xb)
    torch.testing.assert_close(out_fused, out_plain, rtol=1e-4, atol=1e-5)
    upstream = _rand(*out_plain.shape, seed=7, dtype=torch.float32)
    out_fused.backward(upstream), out_plain.backward(upstream)
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-4, atol=1e-5)
    assert_buffers_close(fused, plain, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('sa_type', SA_TYPES)
def test_gradcheck(sa_type):
    module = SelfAttention(sa_type, 4, 2, 4, share_planes=2, kernel_size=3)
    module = randomize_(module, seed=8).double().train()
    bn1, map1, bn2, map2 = module.conv_w[0], module.conv_w[2], module.conv_w[3], module.conv_w[5]
    params = [p.detach().clone().requires_grad_() for p in (
        module.conv1.weight, module.conv1.bias, module.conv2.weight, module.conv2.bias, module.conv3.weight,
        module.conv3.bias, bn1.weight, bn1.bias, map1.weight, bn2.weight, bn2.bias, map2.weight, map2.bias)]
    params.insert(9, None)  # the mapping's first conv has no bias
    x = _rand(2, 4, 3, 4, seed=9).requires_grad_()
    position = _rand(1, 2, 3, 4, seed=10).requires_grad_()

    def attention(x, *tensors):
        it = iter(tensors)
        full = [None if p is None else next(it) for p in params]
        if sa_type == 'pairwise':
            return ops_train._PairwiseAttentionTrainFn.apply(x, next(it), 3, 1e-5, 1e-5, *full)[0]
        return ops_train._PatchwiseAttentionTrainFn.apply(x, 3, 1e-5, 1e-5, *full)[0]

    inputs = [x] + [p for p in params if p is not None] + ([position] if sa_type == 'pairwise' else [])
    assert torch.autograd.gradcheck(attention, inputs, eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=True)


@pytest.mark.parametrize('name', ['san10_pairwise', 'san10_patchwise'])
def test_san10_training_step_equals_the_official_network(name):
    ref = randomize_(official_model(name, pad_fn=repeated_reflect_pad), seed=12).double().train()
    model = timm.create_model(name).double().train()
    model.load_state_dict(ref.state_dict())
    x = _rand(2, 3, 64, 64, seed=13)
    out, expected = model(x), ref(x)
    assert _graph_names(out).count(FUSED_NODE[name.split('_')[1]]) == 10  # every SAM of the network
    torch.testing.assert_close(out, expected, rtol=1e-9, atol=1e-10)
    out.square().mean().backward(), expected.square().mean().backward()
    assert_grads_close(model, ref, rtol=1e-8, atol=1e-11)
    assert_buffers_close(model, ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize('sa_type', SA_TYPES)
def test_one_value_per_channel_is_refused_as_batchnorm_does(sa_type):
    fused, plain = _pair(sa_type, 32, 1)
    x = _rand(1, 32, 1, 1)
    with pytest.raises(ValueError, match='more than 1 value per channel'):
        plain(x)
    with pytest.raises(ValueError, match='more than 1 value per channel'):
        fused(x)


@pytest.mark.parametrize('sa_type', SA_TYPES)
def test_unsupported_cases_keep_the_recomputation_path(sa_type):
    fused, _ = _pair(sa_type, 32, 3)
    x = _rand(2, 32, 5, 5)
    fused.conv_w[3].eval()  # a frozen second BatchNorm: normalises with running statistics
    assert not _fused_taken(fused(x.requires_grad_()))
    fused.conv_w[3].train()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        assert not _fused_taken(fused.float()(x.float()))
