"""1x1 convs as batched matmuls, forward and backward, against ``F.conv2d`` and its autograd."""
import pytest
import torch
import torch.nn.functional as F

from timm_san import matmul_conv


def _rand(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.mark.parametrize('size', [(10, 12), (3, 4)])  # matmuls, and oneDNN's conv below MATMUL_MIN_SPATIAL
@pytest.mark.parametrize('bias', [True, False])
@pytest.mark.parametrize('residual', [True, False])
def test_conv1x1_forward_and_backward_equal_conv2d(size, bias, residual):
    x = _rand(3, 8, *size, seed=1)
    weight, b = _rand(5, 8, 1, 1, seed=2), _rand(5, seed=3) if bias else None
    res = _rand(3, 5, *size, seed=4) if residual else None
    upstream = _rand(3, 5, *size, seed=5)
    leaves = [t.clone().requires_grad_() for t in (x, weight, b, res) if t is not None]
    reference = [t.detach().clone().requires_grad_() for t in leaves]

    def unpack(tensors):
        it = iter(tensors)
        return next(it), next(it), next(it) if bias else None, next(it) if residual else None

    xa, wa, ba, ra = unpack(leaves)
    xb, wb, bb, rb = unpack(reference)
    out = matmul_conv.conv1x1(xa, wa, ba, ra)
    expected = F.conv2d(xb, wb, bb)
    if residual:
        expected = expected + rb
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    out.backward(upstream), expected.backward(upstream)
    for got, want in zip(leaves, reference):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-12, atol=1e-12)


def test_matmul_path_is_an_autograd_function_and_passes_gradcheck():
    x = _rand(2, 3, 10, 10, seed=6).requires_grad_()
    weight, bias = _rand(4, 3, 1, 1, seed=7).requires_grad_(), _rand(4, seed=8).requires_grad_()
    residual = _rand(2, 4, 10, 10, seed=9).requires_grad_()
    out = matmul_conv.conv1x1(x, weight, bias, residual)
    assert type(out.grad_fn).__name__ == '_Conv1x1FnBackward'
    assert torch.autograd.gradcheck(matmul_conv.conv1x1, (x, weight, bias, residual), fast_mode=True)


def test_input_gradient_only_when_asked():
    x, weight = _rand(2, 3, 10, 10, seed=10), _rand(4, 3, 1, 1, seed=11)
    grad = _rand(2, 4, 10, 10, seed=12)
    grad_x, grad_w, grad_b = matmul_conv.conv1x1_backward(grad, x, weight, input_grad=False)
    assert grad_x is None
    want_w = torch.nn.grad.conv2d_weight(x, weight.shape, grad)
    torch.testing.assert_close(grad_w, want_w, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad_b, grad.sum((0, 2, 3)), rtol=1e-12, atol=1e-12)


def test_half_precision_training_keeps_the_conv():
    x = _rand(2, 3, 10, 10, seed=13, dtype=torch.bfloat16).requires_grad_()
    weight = _rand(4, 3, 1, 1, seed=14, dtype=torch.bfloat16).requires_grad_()
    out = matmul_conv.conv1x1(x, weight)
    assert type(out.grad_fn).__name__ != '_Conv1x1FnBackward'
    torch.testing.assert_close(out, F.conv2d(x, weight))
