"""The compiled CPU kernels over the paper's design space, against its definitions (``reference.design_*``).

The model builds only the released configuration today (issue 17 adds the others as ``timm.create_model``
arguments); the kernels already take a relation code, an optional position encoding and any mapping depth. These
tests hold those paths to the paper's definitions, eval, training forward (with the batch statistics) and backward,
in float64, so the model arguments can be built on them.
"""
from typing import List

import pytest
import torch

from timm_san.kernels import cpp
from reference import design_pairwise, design_patchwise

pytestmark = pytest.mark.skipif(not cpp.library(), reason='the compiled CPU kernels cannot be built here')

PAIR_RELATIONS = {'subtraction': 0, 'summation': 1, 'hadamard': 2, 'concatenation': 3, 'dot': 4}
PATCH_RELATIONS = {'concatenation': 0}
R, C, SHARE = 4, 16, 8
CW = C // SHARE


def _rand(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _layers(widths: List[int], seed: int) -> List[dict]:
    """A mapping from ``widths[0]`` channels through ``widths[1:]``: the last conv has a bias, the others none."""
    layers = []
    for index, (fan_in, fan_out) in enumerate(zip(widths[:-1], widths[1:])):
        s = seed + 10 * index
        layers.append(dict(
            norm_weight=1 + 0.2 * _rand(fan_in, seed=s), norm_bias=0.2 * _rand(fan_in, seed=s + 1),
            mean=0.1 * _rand(fan_in, seed=s + 2), var=1 + _rand(fan_in, seed=s + 3).abs(), eps=1e-5,
            weight=_rand(fan_out, fan_in, 1, 1, seed=s + 4) / fan_in ** 0.5,
            bias=0.1 * _rand(fan_out, seed=s + 5) if index == len(widths) - 2 else None))
    return layers


def _norms(layers: List[dict], training: bool) -> List[torch.Tensor]:
    out = []
    for layer in layers:
        out += [layer['norm_weight'], layer['norm_bias']] + ([] if training else [layer['mean'], layer['var']])
    return out


def _convs(layers: List[dict]):
    empty = torch.empty(0, dtype=torch.float64)
    biases = [empty if layer['bias'] is None else layer['bias'] for layer in layers]
    return [layer['weight'] for layer in layers], biases


def _leaves(layers: List[dict]) -> List[torch.Tensor]:
    """The trainable tensors in the kernels' gradient order: per layer norm weight, norm bias, conv weight, bias."""
    out = []
    for layer in layers:
        out += [layer['norm_weight'], layer['norm_bias'], layer['weight']]
        out += [] if layer['bias'] is None else [layer['bias']]
    return out


def _maps(size, seed=0):
    x1, x2 = _rand(2, R, *size, seed=seed), _rand(2, R, *size, seed=seed + 1)
    return x1, x2, _rand(2, C, *size, seed=seed + 2)


def _pair_case(relation: str, position: bool, depth: int, k: int, size):
    x1, x2, x3 = _maps(size)
    in_planes = {'concatenation': 2 * R, 'dot': 1}.get(relation, R) + (2 if position else 0)
    layers = _layers([in_planes] + [R] * (depth - 1) + [CW], seed=100)
    pos = 0.5 * _rand(1, 2, *size, seed=7) if position else None
    return x1, x2, x3, pos, layers


def _check_grads(expected: List[torch.Tensor], kernel_grads: List[torch.Tensor]):
    for index, (e, g) in enumerate(zip(expected, kernel_grads)):
        torch.testing.assert_close(g.reshape(e.shape), e, rtol=1e-7, atol=1e-9, msg=f'gradient {index}')


PAIR_CASES = [(relation, position, depth, 3) for relation in PAIR_RELATIONS for position in (True, False)
              for depth in (1, 2, 3)] + [('dot', True, 2, 5), ('concatenation', False, 3, 5)]


@pytest.mark.parametrize('relation,position,depth,k', PAIR_CASES)
def test_pairwise_variants_equal_their_definition(relation, position, depth, k):
    size = (7, 9)
    x1, x2, x3, pos, layers = _pair_case(relation, position, depth, k, size)
    weights, biases = _convs(layers)
    eps = [layer['eps'] for layer in layers]
    pos_arg = torch.empty(0, dtype=torch.float64) if pos is None else pos
    code = PAIR_RELATIONS[relation]

    out = torch.ops.timm_san_cpp.pairwise_eval(
        x1, x2, x3, pos_arg, _norms(layers, False), eps, weights, biases, k, code)
    torch.testing.assert_close(out, design_pairwise(x1, x2, x3, pos, layers, k, relation, False), rtol=1e-9, atol=1e-10)

    out, saved = torch.ops.timm_san_cpp.pairwise_train(
        x1, x2, x3, pos_arg, _norms(layers, True), eps, weights, biases, k, code)
    inputs = [t.clone().requires_grad_() for t in (x1, x2, x3)] + ([pos.clone().requires_grad_()] if position else [])
    for t in _leaves(layers):
        t.requires_grad_()
    expected = design_pairwise(*inputs[:3], inputs[3] if position else None, layers, k, relation, True)
    torch.testing.assert_close(out, expected.detach(), rtol=1e-9, atol=1e-10)

    grad_out = _rand(*out.shape, seed=3)
    grads = torch.ops.timm_san_cpp.pairwise_backward(
        grad_out, x1, x2, x3, pos_arg, _norms(layers, True), eps, saved, weights, biases, k, code)
    expected_grads = torch.autograd.grad(expected, inputs + _leaves(layers), grad_out)
    kernel_grads = grads[:3] + ([grads[3]] if position else []) + [
        g for g, present in zip(grads[4:], _present(layers)) if present]
    _check_grads(list(expected_grads), kernel_grads)


def _present(layers: List[dict]) -> List[bool]:
    out = []
    for layer in layers:
        out += [True, True, True, layer['bias'] is not None]
    return out


@pytest.mark.parametrize('depth,k', [(1, 3), (2, 3), (3, 3), (3, 5)])
def test_patchwise_variants_equal_their_definition(depth, k):
    size = (6, 8)
    x1, x2, x3 = _maps(size, seed=20)
    layers = _layers([R * (k * k + 1)] + [CW] * (depth - 1) + [CW * k * k], seed=200)
    weights, biases = _convs(layers)
    eps = [layer['eps'] for layer in layers]
    code = PATCH_RELATIONS['concatenation']

    out = torch.ops.timm_san_cpp.patchwise_eval(x1, x2, x3, _norms(layers, False), eps, weights, biases, k, code)
    torch.testing.assert_close(
        out, design_patchwise(x1, x2, x3, layers, k, 'concatenation', False), rtol=1e-9, atol=1e-10)

    out, saved, hidden = torch.ops.timm_san_cpp.patchwise_train(
        x1, x2, x3, _norms(layers, True), eps, weights, biases, k, code)
    inputs = [t.clone().requires_grad_() for t in (x1, x2, x3)]
    for t in _leaves(layers):
        t.requires_grad_()
    expected = design_patchwise(*inputs, layers, k, 'concatenation', True)
    torch.testing.assert_close(out, expected.detach(), rtol=1e-9, atol=1e-10)

    grad_out = _rand(*out.shape, seed=4)
    grads = torch.ops.timm_san_cpp.patchwise_backward(
        grad_out, x1, x2, x3, _norms(layers, True), eps, saved, hidden, weights, biases, k, code)
    expected_grads = torch.autograd.grad(expected, inputs + _leaves(layers), grad_out)
    kernel_grads = grads[:3] + [g for g, present in zip(grads[3:], _present(layers)) if present]
    _check_grads(list(expected_grads), kernel_grads)
