"""The eval-only fusions (stem, pools, 1x1 convs, chunked attention, batch split) against the plain module path."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import freeze_batch_norm_2d

import timm_san  # noqa: F401
from timm_san import eval_ops, eval_stem, fusable, matmul_conv, ops_fused, san as san_module, sam as sam_module
from timm_san.san import SanBottleneck
from timm_san.sam import SelfAttention
from module_compare import assert_buffers_close, assert_grads_close
from reference import randomize_

# one block per stage keeps float64 runs of the whole network short; every stage and fusion is still there
LAYERS = (1, 1, 1, 1, 1)
FUSED_FUNCTIONS = [
    (san_module, 'pooled_stem'), (san_module, 'max_pool2x2'), (san_module, 'conv1x1'),
    (sam_module, 'conv1x1_split'), (sam_module, 'pairwise_attention'), (sam_module, 'patchwise_attention'),
]


def _rand(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _unfuse_(model: nn.Module) -> nn.Module:
    """The plain module path: every module's fused switch off (the SAM then takes the plain operators too)."""
    for m in model.modules():
        if isinstance(m, (san_module.SAN, SanBottleneck, SelfAttention)):
            m.fused = False
    return model


def _model(name: str, **kwargs) -> san_module.SAN:
    return san_module.SAN(sa_type=name.split('_')[1], layers=LAYERS, num_classes=10, **kwargs)


def _pair(name='san10_pairwise', seed=0, **kwargs):
    """(fused model, plain model) with one set of random float64 weights and BatchNorm statistics."""
    fused = randomize_(_model(name, **kwargs), seed=seed).double()
    plain = _unfuse_(_model(name, **kwargs).double())
    plain.load_state_dict(fused.state_dict())
    return fused, plain


def _record_calls(monkeypatch):
    """Count the calls of every fused function (as the model modules see them)."""
    calls = {}
    for module, name in FUSED_FUNCTIONS:
        original = getattr(module, name)

        def counted(*args, _name=name, _original=original, **kwargs):
            calls[_name] = calls.get(_name, 0) + 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(module, name, counted)
    return calls


@pytest.mark.parametrize('name', ['san10_pairwise', 'san10_patchwise'])
@pytest.mark.parametrize('size', [64, (97, 131)])
def test_fused_eval_model_equals_plain_module_path(name, size, monkeypatch):
    fused, plain = _pair(name, seed=1)
    fused.eval(), plain.eval()
    calls = _record_calls(monkeypatch)
    h, w = (size, size) if isinstance(size, int) else size
    x = _rand(3, 3, h, w, seed=2)
    with torch.no_grad():
        expected = plain(x)
        assert not calls
        out = fused(x)
    torch.testing.assert_close(out, expected, rtol=1e-9, atol=1e-12)
    attention = 'pairwise_attention' if 'pair' in name else 'patchwise_attention'
    assert calls['pooled_stem'] == 1 and calls['max_pool2x2'] == 4 and calls[attention] == 5
    assert calls['conv1x1'] >= 5 + 5 and calls['conv1x1_split'] == 5


@pytest.mark.parametrize('name', ['san10_pairwise', 'san10_patchwise'])
def test_batch_split_attention_chunks_and_extended_grid_equal_plain(name, monkeypatch):
    # at 64px the early stages are split 2 (or 1) samples at a time, the attention 1 sample at a time, and the
    # narrow maps (8, 4, 2 pixels) are aggregated on the row-extended grid
    monkeypatch.setattr(san_module, '_SPLIT_ELEMENTS', 2 * 64 * 32 * 32 // torch.get_num_threads())
    monkeypatch.setattr(san_module, '_SPLIT_MIN_STAGE_ELEMENTS', 1)
    monkeypatch.setattr(ops_fused, '_ATTENTION_CHUNK_ELEMENTS', 1)
    fused, plain = _pair(name, seed=3)
    fused.eval(), plain.eval()
    x = _rand(5, 3, 64, 64, seed=4)
    samples, stages = fused._split_plan(x, 4)
    assert samples in (1, 2) and stages == 5
    with torch.no_grad():
        final, feats = fused.forward_intermediates(x)
        plain_final, plain_feats = plain.forward_intermediates(x)
        torch.testing.assert_close(fused(x), plain(x), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(final, plain_final, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(feats, plain_feats, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize('name', ['san10_pairwise', 'san10_patchwise'])
def test_train_mode_never_takes_an_eval_fusion_and_matches_plain(name, monkeypatch):
    fused, plain = _pair(name, seed=5, drop_path_rate=0.1)
    fused.train(), plain.train()

    def refuse(*args, **kwargs):
        raise AssertionError('fused eval function called in training')

    for module, fn in FUSED_FUNCTIONS:
        if fn != 'conv1x1':  # the 1x1 convs as matmuls serve training too (tests/test_matmul_conv.py)
            monkeypatch.setattr(module, fn, refuse)
    x = _rand(2, 3, 64, 64, seed=6)
    torch.manual_seed(0)
    out = fused(x)
    torch.manual_seed(0)
    expected = plain(x)
    # batch statistics, drop path and gradients as the modules compute them; matmuls in place of oneDNN's convs
    # differ by float rounding only
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)
    out.square().mean().backward(), expected.square().mean().backward()
    assert_grads_close(fused, plain, rtol=1e-9, atol=1e-12)
    assert_buffers_close(fused, plain, rtol=1e-10, atol=1e-12)
    with torch.no_grad():
        fused(x)  # training without autograd: still no eval fusion


def test_module_surgery_and_hooks_fall_back_to_the_module_path(monkeypatch):
    fused, plain = _pair('san10_patchwise', seed=7)
    for model in (fused, plain):
        # timm's BatchNorm freezing (FrozenBatchNorm2d, statistics kept) and replaced activations
        model.bn_in = freeze_batch_norm_2d(model.bn_in)
        model.layer1[0].bn2 = freeze_batch_norm_2d(model.layer1[0].bn2)
        model.act0 = nn.SiLU()
        model.layer2[0].act = nn.GELU()
        model.eval()
    assert type(fused.bn_in).__name__ == 'FrozenBatchNorm2d'
    seen = []
    fused.pool1.register_forward_hook(lambda module, args, out: seen.append(out.shape))
    calls = _record_calls(monkeypatch)
    x = _rand(2, 3, 64, 64, seed=9)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), plain(x), rtol=1e-9, atol=1e-12)
    assert 'pooled_stem' not in calls  # FrozenBatchNorm2d in the stem
    assert calls['max_pool2x2'] == 3 and seen == [(2, 64, 16, 16)]  # the hooked pool1 ran as a module
    # the blocks with a replaced bn2 or act attend unfused-norm (the SAM's own fused path is still taken)
    assert calls['patchwise_attention'] == 5


@pytest.mark.parametrize('bias', [False, True])
@pytest.mark.parametrize('size', [(8, 8), (9, 7)])
def test_pooled_stem_equals_conv_bn_relu_pool(bias, size):
    conv = nn.Conv2d(3, 16, 1, bias=bias).double()
    bn = randomize_(nn.BatchNorm2d(16), seed=10).double().eval()
    with torch.no_grad():
        bn.weight[:4].neg_()  # negative scales: the pool must see the normalised values
    x = _rand(2, 3, *size, seed=11)
    expected = F.max_pool2d(torch.relu(bn(conv(x))), 2, 2)
    mean = bn.running_mean if conv.bias is None else bn.running_mean - conv.bias
    with torch.no_grad():
        for chunk in (eval_stem._CHUNK_ELEMENTS, 16 * 3):
            out = eval_stem.pooled_stem(x, conv.weight, bn.weight, bn.bias, mean, bn.running_var, bn.eps, chunk)
            torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


def test_pooled_stem_under_autograd_is_the_module_path():
    conv = nn.Conv2d(3, 8, 1, bias=False).double()
    bn = randomize_(nn.BatchNorm2d(8), seed=12).double().eval()
    x1 = _rand(1, 3, 6, 6, seed=13).requires_grad_()
    x2 = x1.detach().clone().requires_grad_()
    out = eval_stem.pooled_stem(x1, conv.weight, bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.eps)
    expected = F.max_pool2d(torch.relu(bn(conv(x2))), 2, 2)
    upstream = _rand(*out.shape, seed=14)
    out.backward(upstream), expected.backward(upstream)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=0, atol=0)


@pytest.mark.parametrize('size', [(8, 8), (7, 9), (3, 5)])
def test_max_pool2x2_equals_max_pool2d(size):
    x = _rand(2, 3, *size, seed=15)
    x[0, 0, 0, :2] = float('nan')
    torch.testing.assert_close(eval_ops.max_pool2x2(x), F.max_pool2d(x, 2, 2), rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize('size', [(4, 5), (12, 10)])  # below and above the matmul threshold
@pytest.mark.parametrize('bias', [False, True])
def test_conv1x1_equals_conv2d_with_and_without_residual(size, bias):
    conv = nn.Conv2d(6, 5, 1, bias=bias).double()
    x = _rand(3, 6, *size, seed=16)
    residual = _rand(3, 5, *size, seed=17)
    with torch.no_grad():
        torch.testing.assert_close(matmul_conv.conv1x1(x, conv.weight, conv.bias), conv(x), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(
            matmul_conv.conv1x1(x, conv.weight, conv.bias, residual), conv(x) + residual, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize('batch', [1, 4])  # weights too large next to the map to concatenate, and small enough
def test_conv1x1_split_equals_separate_convs(batch):
    convs = [nn.Conv2d(8, 2, 1).double(), nn.Conv2d(8, 2, 1, bias=False).double(), nn.Conv2d(8, 4, 1).double()]
    x = _rand(batch, 8, 10, 12, seed=18)
    with torch.no_grad():
        outs = matmul_conv.conv1x1_split(x, [c.weight for c in convs], [c.bias for c in convs])
        for out, conv in zip(outs, convs):
            torch.testing.assert_close(out, conv(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize('sa_type', ['pairwise', 'patchwise'])
@pytest.mark.parametrize('size', [(5, 6), (20, 30)])  # the row-extended grid, and the plain aggregation
def test_sam_forward_norm_relu_equals_module_path(sa_type, size, monkeypatch):
    monkeypatch.setattr(ops_fused, '_ATTENTION_CHUNK_ELEMENTS', 1)  # one sample per chunk
    sam = randomize_(SelfAttention(sa_type, 32, 4, 16, share_planes=8, kernel_size=7), seed=19).double().eval()
    bn = randomize_(nn.BatchNorm2d(16), seed=20).double().eval()
    plain = _unfuse_(randomize_(SelfAttention(sa_type, 32, 4, 16, share_planes=8, kernel_size=7), seed=19).double())
    plain.eval()
    x = _rand(3, 32, *size, seed=21)
    with torch.no_grad():
        torch.testing.assert_close(
            sam.forward_norm_relu(x, bn), torch.relu(bn(plain(x))), rtol=1e-10, atol=1e-12)
    # with autograd the chunked path is differentiable and gives the plain gradients
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    upstream = _rand(3, 16, *size, seed=22)
    sam.forward_norm_relu(x1, bn).backward(upstream)
    torch.relu(bn(plain(x2))).backward(upstream)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-10, atol=1e-12)


def test_scripted_model_takes_the_plain_path_and_agrees():
    model = randomize_(_model('san10_patchwise'), seed=23).eval()
    scripted = torch.jit.script(model)
    x = _rand(2, 3, 64, 64, seed=24, dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), model(x), rtol=1e-4, atol=1e-5)


def test_fused_weight_chunks_take_the_whole_batch_off_cpu():
    assert ops_fused.offset_chunks(8, 16, 7, 56 * 56, ops_fused._DEVICE_CHUNK_ELEMENTS) == (8, 7)
    meta = torch.empty(8, 16, 56, 56, device='meta')
    assert ops_fused._chunk_elements(meta) == ops_fused._DEVICE_CHUNK_ELEMENTS
    assert ops_fused._attention_samples(meta, 10 ** 9) == 8
    assert not ops_fused._use_extended(meta, 7)


@pytest.mark.parametrize('name', ['san10_pairwise', 'san10_patchwise'])
def test_autocast_eval_takes_the_module_path(name, monkeypatch):
    # the fusions compute in one dtype with out= arithmetic: under autocast the modules must cast per layer
    fused, plain = _pair(name, seed=7)
    fused, plain = fused.float().eval(), plain.float().eval()
    calls = _record_calls(monkeypatch)
    x = _rand(2, 3, 64, 64, seed=8, dtype=torch.float32)
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        out, expected = fused(x), plain(x)
    assert not calls
    assert out.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    with torch.no_grad():
        fused(x)
    assert calls, 'outside autocast the fusions must run again'


def test_fusions_run_only_on_the_listed_devices(monkeypatch):
    fused, _ = _pair('san10_pairwise', seed=9)
    fused.eval()
    calls = _record_calls(monkeypatch)
    monkeypatch.setattr(fusable, 'EVAL_FUSION_DEVICES', ('cuda',))
    with torch.no_grad():
        fused(_rand(1, 3, 64, 64, seed=10))
    assert not calls
