"""Operators against loop-level transcriptions of the official CUDA kernels, forward and backward."""
import numpy as np
import pytest
import torch

from timm_san import ops
from reference import (
    OutOfBounds, _reflect, aggregation_backward_loop, aggregation_loop, subtraction2_backward_loop, subtraction2_loop,
    subtraction_backward_loop, subtraction_loop,
)

# (k, H, W): maps where the official kernels are defined (pad < side), odd and even, square and not
DEFINED = [(3, 4, 5), (3, 2, 2), (5, 5, 3), (7, 4, 6), (7, 5, 5)]
# maps not larger than the half-width: the official kernels read out of bounds there
SMALL = [(7, 3, 3), (7, 2, 5), (7, 1, 4), (5, 1, 1), (3, 1, 2)]


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize('k,h,w', DEFINED)
def test_subtraction2_matches_official_kernel(k, h, w):
    x1, x2 = _rand(2, 3, h, w, seed=1), _rand(2, 3, h, w, seed=2)
    out = ops.subtraction2(x1, x2, k)
    np.testing.assert_allclose(out.numpy(), subtraction2_loop(x1.numpy(), x2.numpy(), k), rtol=0, atol=1e-12)


@pytest.mark.parametrize('k,h,w', DEFINED)
def test_subtraction_matches_official_kernel(k, h, w):
    x = _rand(2, 3, h, w)
    np.testing.assert_allclose(ops.subtraction(x, k).numpy(), subtraction_loop(x.numpy(), k), rtol=0, atol=1e-12)


@pytest.mark.parametrize('k,h,w', DEFINED)
@pytest.mark.parametrize('channels,weight_channels', [(8, 2), (6, 3), (4, 4)])
def test_aggregation_matches_official_kernel(k, h, w, channels, weight_channels):
    x, wt = _rand(2, channels, h, w, seed=3), _rand(2, weight_channels, k * k, h * w, seed=4)
    out = ops.aggregation(x, wt, k)
    np.testing.assert_allclose(out.numpy(), aggregation_loop(x.numpy(), wt.numpy(), k), rtol=0, atol=1e-12)


def test_aggregation_shares_weights_interleaved():
    # channel c must use weight channel c % Cw: with Cw = 2, channels 0 and 2 share, 0 and 1 do not
    k, x = 3, torch.ones(1, 4, 3, 3, dtype=torch.float64)
    wt = torch.zeros(1, 2, 9, 9, dtype=torch.float64)
    wt[:, 0] = 1.0
    out = ops.aggregation(x, wt, k)
    assert torch.all(out[:, [0, 2]] == 9.0) and torch.all(out[:, [1, 3]] == 0.0)


@pytest.mark.parametrize('k,h,w', DEFINED)
def test_subtraction2_backward_matches_official_kernels(k, h, w):
    x1 = _rand(2, 3, h, w, seed=1).requires_grad_()
    x2 = _rand(2, 3, h, w, seed=2).requires_grad_()
    top = _rand(2, 3, k * k, h * w, seed=5)
    ops.subtraction2(x1, x2, k).backward(top)
    g1, g2 = subtraction2_backward_loop(top.numpy(), x1.shape, k)
    np.testing.assert_allclose(x1.grad.numpy(), g1, atol=1e-12)
    np.testing.assert_allclose(x2.grad.numpy(), g2, atol=1e-12)


@pytest.mark.parametrize('k,h,w', DEFINED)
def test_subtraction_backward_matches_official_kernel(k, h, w):
    x = _rand(2, 3, h, w).requires_grad_()
    top = _rand(2, 3, k * k, h * w, seed=5)
    ops.subtraction(x, k).backward(top)
    np.testing.assert_allclose(x.grad.numpy(), subtraction_backward_loop(top.numpy(), x.shape, k), atol=1e-12)


@pytest.mark.parametrize('k,h,w', DEFINED)
def test_aggregation_backward_matches_official_kernels(k, h, w):
    x = _rand(2, 8, h, w, seed=3).requires_grad_()
    wt = _rand(2, 2, k * k, h * w, seed=4).requires_grad_()
    top = _rand(2, 8, h, w, seed=6)
    ops.aggregation(x, wt, k).backward(top)
    gx, gw = aggregation_backward_loop(top.numpy(), x.detach().numpy(), wt.detach().numpy(), k)
    np.testing.assert_allclose(x.grad.numpy(), gx, atol=1e-12)
    np.testing.assert_allclose(wt.grad.numpy(), gw, atol=1e-12)


@pytest.mark.parametrize('k,h,w', SMALL)
def test_small_maps_are_undefined_officially_and_reflect_repeatedly_here(k, h, w):
    x1, x2 = _rand(1, 2, h, w, seed=1), _rand(1, 2, h, w, seed=2)
    with pytest.raises(OutOfBounds):
        subtraction2_loop(x1.numpy(), x2.numpy(), k)
    expected = subtraction2_loop(x1.numpy(), x2.numpy(), k, repeat_reflect=True)
    np.testing.assert_allclose(ops.subtraction2(x1, x2, k).numpy(), expected, atol=1e-12)
    wt = _rand(1, 1, k * k, h * w, seed=3)
    expected = aggregation_loop(x1.numpy(), wt.numpy(), k, repeat_reflect=True)
    np.testing.assert_allclose(ops.aggregation(x1, wt, k).numpy(), expected, atol=1e-12)


def test_repeated_reflection_agrees_with_official_where_the_kernel_reads_in_bounds():
    # on a 3-wide map with k = 7 the kernels stay in bounds for some reads (a double reflection): those must
    # equal ours; the others are the reads the kernels leave undefined
    k, size, pad = 7, 3, 3
    x = _rand(1, 1, size, size)
    ours = ops.footprint(x, k)
    checked = 0
    for h in range(size):
        for w in range(size):
            for kh in range(k):
                for kw in range(k):
                    try:
                        hi, wi = _reflect(h - pad + kh, size, False), _reflect(w - pad + kw, size, False)
                    except OutOfBounds:
                        continue
                    assert ours[0, 0, kh * k + kw, h * size + w] == x[0, 0, hi, wi]
                    checked += 1
    assert 0 < checked < size * size * k * k


@pytest.mark.parametrize('k,h,w', DEFINED[:3] + SMALL[:3])
def test_gradcheck_float64(k, h, w):
    x1 = _rand(1, 4, h, w, seed=1).requires_grad_()
    x2 = _rand(1, 4, h, w, seed=2).requires_grad_()
    wt = _rand(1, 2, k * k, h * w, seed=3).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: ops.subtraction2(a, b, k), (x1, x2))
    assert torch.autograd.gradcheck(lambda a: ops.subtraction(a, k), (x1,))
    assert torch.autograd.gradcheck(lambda a, b: ops.aggregation(a, b, k), (x1, wt))
    assert torch.autograd.gradcheck(lambda a: ops.footprint(a, k), (x1,))


def test_position_grid_is_the_official_coordinate_grid():
    x = torch.zeros(2, 5, 3, 4)
    grid = ops.position_grid(x)
    assert grid.shape == (1, 2, 3, 4)
    for h in range(3):
        for w in range(4):
            assert grid[0, 0, h, w] == pytest.approx(-1 + 2 * w / 3)  # linspace over the width
            assert grid[0, 1, h, w] == pytest.approx(-1 + 2 * h / 2)  # linspace over the height


@pytest.mark.parametrize('bad', [
    lambda: ops.aggregation(torch.zeros(1, 6, 4, 4), torch.zeros(1, 4, 9, 16), 3),  # 6 % 4 != 0
    lambda: ops.aggregation(torch.zeros(1, 8, 4, 4), torch.zeros(1, 4, 25, 16), 3),  # offsets != k*k
    lambda: ops.aggregation(torch.zeros(1, 8, 4, 4), torch.zeros(2, 4, 9, 16), 3),  # batch differs
    lambda: ops.subtraction2(torch.zeros(1, 2, 4, 4), torch.zeros(1, 2, 4, 5), 3),
    lambda: ops.footprint(torch.zeros(1, 2, 4, 4), 4),  # even footprint
])
def test_bad_shapes_raise_clear_errors(bad):
    with pytest.raises(ValueError, match='must|needs'):
        bad()
