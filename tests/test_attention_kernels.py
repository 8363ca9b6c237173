"""The attention operators' CPU kernels (eval and training) against their reference kernel, chosen by the switch.

Every comparison runs one module twice: on a CPU backend (``cpp``, the compiled kernels, and ``cpu``, each in turn
through the ``backend`` fixture; the debug log confirms which ran) and under ``ops.use_kernels('reference')``. The
reference itself is checked against the official network in test_parity.py and test_sam.py.
"""
import copy

import pytest
import torch
import torch.nn as nn
import timm
from timm.layers import freeze_batch_norm_2d

import timm_san  # noqa: F401
from timm_san import ops
from timm_san.sam import SelfAttention
from timm_san.san import SAN
from module_compare import assert_buffers_close, assert_grads_close
from reference import official_model, randomize_, repeated_reflect_pad

SA_TYPES = ['pairwise', 'patchwise']


def _rand(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _sam(sa_type: str, planes: int, kernel_size: int, seed: int = 0) -> SelfAttention:
    module = SelfAttention(sa_type, planes, max(1, planes // 16), planes // 4, share_planes=8, kernel_size=kernel_size)
    return randomize_(module, seed=seed).double()


def _kernels(runs) -> set:
    return {kernel for _, kernel in runs}


# --- eval

@pytest.mark.parametrize('sa_type', SA_TYPES)
@pytest.mark.parametrize('kernel_size,size', [(3, (5, 6)), (7, (8, 9)), (7, (3, 2)), (5, (1, 1)), (7, (4, 30))])
def test_eval_kernel_equals_the_reference(sa_type, kernel_size, size, kernels_run, backend):
    # (4, 30): wider than the row-extended grid's limit; the others take it
    module = _sam(sa_type, 32, kernel_size).eval()
    x = _rand(3, 32, *size, seed=1)
    with torch.no_grad():
        out = module(x)
        assert _kernels(kernels_run()) == {backend}
        with ops.use_kernels('reference'):
            expected = module(x)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize('sa_type', SA_TYPES)
@pytest.mark.parametrize('size', [(60, 60), (150, 28)])
def test_eval_kernel_in_uneven_sample_chunks(sa_type, size, backend):
    # with one thread, a sample's weights (49 * H * W here) fill half the chunk budget: batches of 3 run as
    # chunks of 2 and 1, on the plain aggregation (60 wide) and on the row-extended grid (28 wide)
    module = _sam(sa_type, 32, 7, seed=2).eval()
    x = _rand(3, 32, *size, seed=3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            out = module(x)
            with ops.use_kernels('reference'):
                expected = module(x)
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize('sa_type', SA_TYPES)
def test_eval_kernel_is_differentiable(sa_type, kernels_run, backend):
    # an eval-mode model asked for input gradients: the CPU forward, the reference's recomputing backward
    module = _sam(sa_type, 32, 7, seed=4).eval()
    x = _rand(2, 32, 6, 7, seed=5)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    out = module(xa)
    assert _kernels(kernels_run()) == {backend}
    reference = copy.deepcopy(module)
    with ops.use_kernels('reference'):
        expected = reference(xb)
    upstream = _rand(*out.shape, seed=6)
    out.backward(upstream), expected.backward(upstream)
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-10, atol=1e-12)
    assert_grads_close(module, reference, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize('name', ['san10_pairwise', 'san10_patchwise'])
@pytest.mark.parametrize('size', [(64, 64), (96, 72)])
def test_model_eval_kernels_equal_the_reference(name, size, kernels_run, backend):
    model = randomize_(SAN(sa_type=name.split('_')[1], layers=(1, 1, 1, 1, 1), num_classes=10), seed=7)
    model = model.double().eval()
    x = _rand(2, 3, *size, seed=8)
    with torch.no_grad():
        out, feats = model(x), model.forward_intermediates(x, intermediates_only=True)
        assert _kernels(kernels_run()) == {backend}
        with ops.use_kernels('reference'):
            expected, expected_feats = model(x), model.forward_intermediates(x, intermediates_only=True)
    torch.testing.assert_close(out, expected, rtol=1e-9, atol=1e-12)
    for got, want in zip(feats, expected_feats):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


# --- training

def _assert_step_equal(module: nn.Module, reference: nn.Module, x: torch.Tensor, seed: int, kernels_run,
                       backend: str) -> None:
    """One training step of both modules, the second on the reference kernels: outputs, gradients, buffers."""
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    kernels_run()  # from here on
    out = module(xa)
    assert _kernels(kernels_run()) == {backend}
    with ops.use_kernels('reference'):
        expected = reference(xb)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)
    upstream = _rand(*expected.shape, seed=seed)
    out.backward(upstream)
    with ops.use_kernels('reference'):
        expected.backward(upstream)
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-10, atol=1e-12)
    assert_grads_close(module, reference, rtol=1e-10, atol=1e-12)
    assert_buffers_close(module, reference, rtol=1e-12, atol=1e-14)
    module.zero_grad(), reference.zero_grad()


@pytest.mark.parametrize('sa_type', SA_TYPES)
@pytest.mark.parametrize('planes,kernel_size,size', [
    (32, 3, (9, 10)), (64, 7, (9, 10)), (32, 7, (5, 5)), (64, 7, (3, 2)), (32, 3, (1, 1)),
    (256, 7, (32, 33)),  # several chunks of footprint rows; large enough maps for the shifted-add scatter
])
def test_two_training_steps_equal_the_reference(sa_type, planes, kernel_size, size, kernels_run, backend):
    module = _sam(sa_type, planes, kernel_size).train()
    reference = copy.deepcopy(module)
    for step in range(2):
        _assert_step_equal(
            module, reference, _rand(3, planes, *size, seed=10 + step), 20 + step, kernels_run, backend)
    assert module.conv_w[0].num_batches_tracked.item() == 12345 + 2


@pytest.mark.parametrize('sa_type', SA_TYPES)
def test_cumulative_average_non_affine_bn_and_biases(sa_type, kernels_run, backend):
    module = _sam(sa_type, 64, 7, seed=3).train()
    mapping_in, hidden = module.conv_w[2].in_channels, module.conv_w[2].out_channels
    module.conv_w[0] = nn.BatchNorm2d(mapping_in, momentum=None, affine=False).double()
    module.conv_w[2] = nn.Conv2d(mapping_in, hidden, 1, bias=True).double()
    module.conv_w[5] = nn.Conv2d(hidden, module.conv_w[5].out_channels, 1, bias=False).double()
    module.conv1 = nn.Conv2d(64, module.conv1.out_channels, 1, bias=False).double()
    randomize_(module, seed=4)
    reference = copy.deepcopy(module)
    for step in range(2):
        _assert_step_equal(module, reference, _rand(2, 64, 6, 7, seed=30 + step), 40 + step, kernels_run, backend)


@pytest.mark.parametrize('sa_type', SA_TYPES)
def test_channels_last_input_and_module(sa_type, kernels_run, backend):
    module = _sam(sa_type, 64, 7, seed=11).train().to(memory_format=torch.channels_last)
    reference = copy.deepcopy(module)
    x = _rand(2, 64, 9, 10, seed=12).to(memory_format=torch.channels_last)
    _assert_step_equal(module, reference, x, 13, kernels_run, backend)


@pytest.mark.parametrize('sa_type', SA_TYPES)
def test_float32_training_stays_close_to_the_reference(sa_type, backend):
    module = _sam(sa_type, 64, 7, seed=5).float().train()
    reference = copy.deepcopy(module)
    x = _rand(2, 64, 12, 11, seed=6, dtype=torch.float32) * 3 + 1
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    out = module(xa)
    with ops.use_kernels('reference'):
        expected = reference(xb)
        torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
        upstream = _rand(*out.shape, seed=7, dtype=torch.float32)
        out.backward(upstream), expected.backward(upstream)
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-4, atol=1e-5)
    assert_buffers_close(module, reference, rtol=1e-5, atol=1e-6)


def _attention_inputs(sa_type: str, seed: int):
    module = randomize_(SelfAttention(sa_type, 4, 2, 4, share_planes=2, kernel_size=3), seed=seed).double()
    bn1, map1, bn2, map2 = module.conv_w[0], module.conv_w[2], module.conv_w[3], module.conv_w[5]
    params = [None if p is None else p.detach().clone().requires_grad_() for p in (
        module.conv1.weight, module.conv1.bias, module.conv2.weight, module.conv2.bias, module.conv3.weight,
        module.conv3.bias, bn1.weight, bn1.bias, map1.weight, map1.bias, bn2.weight, bn2.bias, map2.weight,
        map2.bias)]
    running = [bn1.running_mean, bn1.running_var, bn2.running_mean, bn2.running_var]
    return params, running


@pytest.mark.parametrize('sa_type', SA_TYPES)
@pytest.mark.parametrize('kernels', ['cpp', 'cpu', 'reference'])
@pytest.mark.parametrize('batch_stats', [True, False])
def test_gradcheck(sa_type, kernels, batch_stats):
    params, running = _attention_inputs(sa_type, seed=8)
    x = _rand(2, 4, 3, 4, seed=9).requires_grad_()
    position = _rand(1, 2, 3, 4, seed=10).requires_grad_()
    present = [p for p in params if p is not None]

    def attention(x, position, *tensors):
        it = iter(tensors)
        full = [None if p is None else next(it) for p in params]
        if sa_type == 'pairwise':
            return ops.pairwise_attention(x, full, running, position, 3, [1e-5, 1e-5], [batch_stats] * 2)[0]
        return ops.patchwise_attention(x, full, running, 3, [1e-5, 1e-5], [batch_stats] * 2)[0]

    with ops.use_kernels(kernels):
        assert torch.autograd.gradcheck(
            attention, [x, position, *present], eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=True)


@pytest.mark.parametrize('name', ['san10_pairwise', 'san10_patchwise'])
def test_san10_training_step_equals_the_official_network(name, kernels_run, backend):
    ref = randomize_(official_model(name, pad_fn=repeated_reflect_pad), seed=12).double().train()
    model = timm.create_model(name).double().train()
    model.load_state_dict(ref.state_dict())
    x = _rand(2, 3, 64, 64, seed=13)
    out, expected = model(x), ref(x)
    assert kernels_run() == [[f'{name.split("_")[1]}_attention', backend]] * 10  # every SAM of the network
    torch.testing.assert_close(out, expected, rtol=1e-9, atol=1e-10)
    out.square().mean().backward(), expected.square().mean().backward()
    assert_grads_close(model, ref, rtol=1e-8, atol=1e-11)
    assert_buffers_close(model, ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize('sa_type', SA_TYPES)
@pytest.mark.parametrize('kernels', ['cpp', 'cpu', 'reference'])
def test_one_value_per_channel_is_refused_as_batchnorm_does(sa_type, kernels):
    module = _sam(sa_type, 32, 1).train()
    with ops.use_kernels(kernels), pytest.raises(ValueError, match='more than 1 value per channel'):
        module(_rand(1, 32, 1, 1))


@pytest.mark.parametrize('sa_type', SA_TYPES)
def test_mixed_norm_modes_take_the_reference(sa_type, kernels_run):
    module = _sam(sa_type, 32, 3).train()
    reference = copy.deepcopy(module)
    module.conv_w[3].eval(), reference.conv_w[3].eval()  # the second norm on its running statistics
    out = module(_rand(2, 32, 5, 5))
    assert _kernels(kernels_run()) == {'reference'}
    # its running statistics stay, the first norm's move
    torch.testing.assert_close(module.conv_w[3].running_mean, reference.conv_w[3].running_mean, rtol=0, atol=0)
    assert not torch.equal(module.conv_w[0].running_mean, reference.conv_w[0].running_mean)
    assert out.shape == (2, 8, 5, 5)


@pytest.mark.parametrize('name', ['san10_pairwise', 'san10_patchwise'])
def test_bf16_autocast_training_step(name, kernels_run):
    # bf16 maps reach the attention with float32 parameters: it computes in the maps' dtype, on the reference
    # (the CPU training kernels sum in the tensors' dtype, too coarse in bf16)
    model = timm.create_model(name, num_classes=10).train()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        loss = model(_rand(2, 3, 64, 64, dtype=torch.float32)).float().square().mean()
    loss.backward()
    runs = kernels_run()
    assert len(runs) == 10 and _kernels(runs) == {'reference'}
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters())
    assert model.layer2[0].sam.conv1.weight.grad.abs().sum() > 0


@pytest.mark.parametrize('sa_type', SA_TYPES)
def test_frozen_mapping_norms_keep_their_statistics_in_training(sa_type):
    # timm's freeze_batch_norm_2d swaps in FrozenBatchNorm2d: a training forward then normalises with (and keeps)
    # the running statistics, as the frozen module does
    module = freeze_batch_norm_2d(_sam(sa_type, 32, 3, seed=14).eval())
    assert type(module.conv_w[0]).__name__ == 'FrozenBatchNorm2d'
    x = _rand(2, 32, 5, 6, seed=15)
    with torch.no_grad():
        expected = module(x)
        buffers = {k: v.clone() for k, v in module.named_buffers()}
        out = module.train()(x)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    assert all(torch.equal(v, buffers[k]) for k, v in module.named_buffers())
