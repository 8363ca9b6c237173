"""The fast paths (fused eval operators, custom autograd, recomputation in training) against the plain operators."""
import pytest
import torch

from timm_san import ops, ops_fused, sam as sam_module
from timm_san.sam import SelfAttention
from module_compare import assert_buffers_close, assert_grads_close
from reference import randomize_


def _rand(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _sam(sa_type: str, kernel_size: int, seed: int = 0, planes: int = 32) -> SelfAttention:
    module = SelfAttention(sa_type, planes, planes // 8, planes // 2, share_planes=8, kernel_size=kernel_size)
    return randomize_(module, seed=seed).double()


def _plain(module: SelfAttention, x: torch.Tensor) -> torch.Tensor:
    return module._attend(module.conv1(x), module.conv2(x), module.conv3(x))


@pytest.fixture(params=[1 << 18, 300], ids=['default-chunks', 'tiny-chunks'])
def chunk_elements(request, monkeypatch):
    """Run with the default chunking and with chunks of one footprint row of one sample."""
    original = ops_fused.offset_chunks
    sizes = []

    def chunks(batch: int, planes: int, kernel_size: int, spatial: int, chunk_elements: int = 0):
        sizes.append(original(batch, planes, kernel_size, spatial, request.param))
        return sizes[-1]

    monkeypatch.setattr(ops_fused, 'offset_chunks', chunks)
    yield request.param
    assert sizes  # the chunking under test was really the one taken


@pytest.mark.parametrize('sa_type', ['pairwise', 'patchwise'])
@pytest.mark.parametrize('kernel_size,size', [(3, (5, 6)), (7, (8, 9)), (7, (3, 2)), (5, (1, 1))])
def test_fused_eval_equals_plain(sa_type, kernel_size, size, chunk_elements):
    module = _sam(sa_type, kernel_size).eval()
    x = _rand(3, 32, *size, seed=1)
    with torch.no_grad():
        expected = _plain(module, x)
        fused = module(x)
    torch.testing.assert_close(fused, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize('sa_type', ['pairwise', 'patchwise'])
@pytest.mark.parametrize('size', [(5, 6), (4, 30)])  # the row-extended grid, and the plain aggregation
def test_fused_eval_in_uneven_sample_chunks_equals_plain(sa_type, size, monkeypatch):
    # three samples in chunks of two: the chunks share one weights buffer and one output, and the last chunk
    # uses only part of them
    monkeypatch.setattr(ops_fused, '_attention_samples', lambda x, per_sample: min(2, x.shape[0]))
    chunk_samples = []
    attend = ops_fused._attend_chunk
    monkeypatch.setattr(
        ops_fused, '_attend_chunk', lambda x3, *args: chunk_samples.append(x3.shape[0]) or attend(x3, *args))
    module = _sam(sa_type, 7).eval()
    norm = randomize_(torch.nn.BatchNorm2d(16), seed=9).double().eval()
    x = _rand(3, 32, *size, seed=8)
    with torch.no_grad():
        expected = _plain(module, x)
        torch.testing.assert_close(module(x), expected, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(
            module.forward_norm_relu(x, norm), torch.relu(norm(expected)), rtol=1e-10, atol=1e-12)
    assert chunk_samples == [2, 1, 2, 1]


@pytest.mark.parametrize('sa_type', ['pairwise', 'patchwise'])
def test_fused_eval_path_is_taken_and_differentiable(sa_type, monkeypatch):
    calls = []
    name = f'{sa_type}_attention'
    original = getattr(sam_module, name)
    monkeypatch.setattr(sam_module, name, lambda *args, **kwargs: calls.append(1) or original(*args, **kwargs))
    module = _sam(sa_type, 7).eval()
    x1 = _rand(2, 32, 9, 8, seed=2).requires_grad_()
    x2 = x1.detach().clone().requires_grad_()
    upstream = _rand(2, 16, 9, 8, seed=3)
    module(x1).backward(upstream)
    assert calls == [1]
    _plain(module, x2).backward(upstream)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize('sa_type', ['pairwise', 'patchwise'])
def test_train_mode_never_takes_the_fused_path(sa_type, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError('fused eval operator called in training')

    monkeypatch.setattr(sam_module, f'{sa_type}_attention', refuse)
    module = _sam(sa_type, 3).train()
    x = _rand(2, 32, 5, 5, seed=4)
    module(x)
    with torch.no_grad():
        module(x)


@pytest.mark.parametrize('sa_type', ['pairwise', 'patchwise'])
def test_recomputed_training_equals_plain_autograd(sa_type, monkeypatch):
    # training takes the fused operators on CPU (tests/test_ops_train.py); the recomputation stays for the
    # cases those operators leave out (other devices, autocast), so it is tested here with them turned off
    monkeypatch.setattr(sam_module, 'train_supported', lambda *args: False)
    fast, plain = _sam(sa_type, 7, seed=5).train(), _sam(sa_type, 7, seed=5).train()
    plain.recompute = False
    x1 = _rand(2, 32, 8, 7, seed=6).requires_grad_()
    x2 = x1.detach().clone().requires_grad_()
    upstream = _rand(2, 16, 8, 7, seed=7)
    out_fast, out_plain = fast(x1), plain(x2)
    assert out_fast.grad_fn is not None
    torch.testing.assert_close(out_fast, out_plain, rtol=0, atol=0)
    out_fast.backward(upstream), out_plain.backward(upstream)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-12, atol=1e-14)
    assert_grads_close(fast, plain, rtol=1e-12, atol=1e-14)
    # the recomputation in backward must leave the running statistics as one forward left them
    assert_buffers_close(fast, plain, rtol=0, atol=0)
    assert fast.conv_w[0].num_batches_tracked.item() == 12345 + 1


@pytest.mark.parametrize('k,h,w', [(3, 4, 5), (7, 5, 6), (7, 3, 2), (5, 1, 1)])
def test_custom_backward_equals_autograd_of_the_plain_operators(k, h, w):
    x1, x2 = _rand(2, 8, h, w, seed=1), _rand(2, 8, h, w, seed=2)
    weight = _rand(2, 2, k * k, h * w, seed=3)
    top = _rand(2, 8, k * k, h * w, seed=4)
    top_agg = _rand(2, 8, h, w, seed=5)
    cases = [
        (ops.subtraction2, ops._subtraction2, (x1, x2), top),
        (ops.footprint, ops._footprint, (x1,), top),
        (ops.subtraction, lambda a, kk: ops._subtraction2(a, a, kk), (x1,), top),
        (ops.aggregation, ops._aggregation, (x1, weight), top_agg),
    ]
    for fast, plain, inputs, upstream in cases:
        a = [t.clone().requires_grad_() for t in inputs]
        b = [t.clone().requires_grad_() for t in inputs]
        out_fast, out_plain = fast(*a, k), plain(*b, k)
        torch.testing.assert_close(out_fast, out_plain, rtol=0, atol=0)
        out_fast.backward(upstream), out_plain.backward(upstream)
        for ga, gb in zip(a, b):
            torch.testing.assert_close(ga.grad, gb.grad, rtol=1e-12, atol=1e-12)


def test_offset_chunks_cover_rows_before_samples():
    assert ops_fused.offset_chunks(8, 16, 7, 56 * 56) == (1, 1)  # a row of one sample is already large
    samples, rows = ops_fused.offset_chunks(8, 4, 3, 7 * 7)
    assert rows == 3 and samples == 8


@pytest.mark.parametrize('name', ['san10_pairwise', 'san10_patchwise'])
def test_fx_trace_of_the_fused_path_is_bitwise_and_reads_live_buffers(name):
    import timm
    from timm.models._features_fx import create_feature_extractor
    model = timm.create_model(name, num_classes=10).eval()
    traced = create_feature_extractor(model, return_nodes={'fc': 'out'})
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(traced(x)['out'], model(x))
        # statistics loaded after tracing must reach the trace (folded at run time, not baked in as constants)
        for key, b in model.named_buffers():
            if key.endswith('running_var'):
                b.mul_(1.5)
        assert torch.equal(traced(x)['out'], model(x))
