"""Triton kernels (timm_san.kernels.triton) against the loop transcriptions of the official kernels, and their dispatch.

With CUDA the kernel tests run the compiled kernels on the GPU, and the ``cuda_only`` tests check that the public
operators really dispatch to them. Without CUDA the kernels run on CPU tensors under Triton's interpreter. Triton
reads ``TRITON_INTERPRET`` when a function is decorated, and its own library functions (``tl.cdiv``, ``tl.sum``)
are decorated when Triton is first imported, which ``import timm`` already does: so the interpreter cannot be
turned on inside this session, and ``test_kernels_under_the_interpreter`` runs this file again in a subprocess
with ``TRITON_INTERPRET=1``, leaving the rest of the session (torch.compile, Inductor) untouched.
"""
import logging
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from timm_san import ops
from timm_san.kernels import reference
from reference import (
    _neighbours, aggregation_backward_loop, aggregation_loop, repeated_reflect_pad, subtraction2_backward_loop,
    subtraction2_loop, subtraction_backward_loop, subtraction_loop,
)

pytest.importorskip('triton')
from timm_san.kernels import triton as ops_triton  # noqa: E402

CUDA = torch.cuda.is_available()
INTERPRETER = os.environ.get('TRITON_INTERPRET', '0') == '1'
cuda_only = pytest.mark.skipif(not CUDA, reason='needs CUDA (the compiled kernels and the dispatch)')
kernels = pytest.mark.skipif(
    not (CUDA or INTERPRETER), reason='without CUDA, test_kernels_under_the_interpreter runs these in a subprocess')

# (k, H, W, batch): maps where one reflection suffices, and maps not longer than the padding (repeated
# reflection: 3x4 with k = 7, 1xN, Nx1)
DEFINED = [(3, 5, 6, 2), (5, 7, 7, 1), (7, 4, 5, 1)]
SMALL = [(7, 3, 4, 1), (5, 1, 6, 2), (3, 4, 1, 1)]


@pytest.fixture
def device() -> torch.device:
    return torch.device('cuda' if CUDA else 'cpu')


@pytest.mark.skipif(CUDA or INTERPRETER, reason='the kernel tests run in this session')
def test_kernels_under_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET='1')
    command = [sys.executable, '-m', 'pytest', __file__, '-q', '-x', '-p', 'no:cacheprovider']
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-8000:] + proc.stderr[-4000:]
    assert ' passed' in proc.stdout and ' failed' not in proc.stdout


def _rand(*shape, seed=0, dtype=torch.float64) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _close(actual: torch.Tensor, expected, atol=1e-12, rtol=0.0):
    expected = torch.as_tensor(expected, dtype=torch.float64)
    torch.testing.assert_close(actual.cpu().double(), expected, atol=atol, rtol=rtol)


def _footprint_grad_reference(top: torch.Tensor, shape, k: int) -> torch.Tensor:
    """Gradient of the footprint gather on any map (the loop references fold only where one reflection is
    defined): autograd of the reference's unfold over its index-by-index repeated reflection."""
    x = torch.zeros(shape, dtype=torch.float64, requires_grad=True)
    _neighbours(x, k, repeated_reflect_pad).backward(top)
    return x.grad


@pytest.mark.parametrize('k,h,w,batch', DEFINED + SMALL)
@kernels
def test_relations_forward(k, h, w, batch, device):
    x1, x2 = _rand(batch, 8, h, w, seed=1), _rand(batch, 8, h, w, seed=2)
    a, b = x1.numpy(), x2.numpy()
    _close(ops_triton.subtraction2(x1.to(device), x2.to(device), k), subtraction2_loop(a, b, k, repeat_reflect=True))
    _close(ops_triton.subtraction2(x2.to(device), x2.to(device), k), subtraction_loop(b, k, repeat_reflect=True))
    # the footprint is the relation with a zero centre, negated
    expected = -subtraction2_loop(np.zeros_like(b), b, k, repeat_reflect=True)
    _close(ops_triton.footprint(x2.to(device), k), expected)


@pytest.mark.parametrize('k,h,w,batch', DEFINED + SMALL)
@kernels
def test_relations_backward(k, h, w, batch, device):
    shape = (batch, 8, h, w)
    top = _rand(batch, 8, k * k, h * w, seed=3)
    top_dev = top.to(device)
    grad1 = ops_triton.offset_sum(top_dev, h, w, torch.float64)
    grad2 = ops_triton.footprint_backward(top_dev, h, w, k, torch.float64, negate=True)
    grad_self = ops_triton.footprint_backward(top_dev, h, w, k, torch.float64, negate=True, centre=True)
    grad_footprint = ops_triton.footprint_backward(top_dev, h, w, k, torch.float64)
    if (k, h, w, batch) in DEFINED:
        ref1, ref2 = subtraction2_backward_loop(top.numpy(), shape, k)
        ref_self = subtraction_backward_loop(top.numpy(), shape, k)
    else:
        ref2 = -_footprint_grad_reference(top, shape, k)
        ref1 = top.sum(2).reshape(shape)
        ref_self = ref1 + ref2
    _close(grad1, ref1)
    _close(grad2, ref2)
    _close(grad_self, ref_self)
    _close(grad_footprint, -torch.as_tensor(ref2))


@kernels
@pytest.mark.parametrize('k,h,w,batch,weight_channels', [
    case + (weight_channels,) for case, weight_channels in zip(DEFINED + SMALL, [2, 4, 2, 4, 2, 4])])
def test_aggregation_forward_and_backward(k, h, w, batch, weight_channels, device):
    x, weight = _rand(batch, 8, h, w, seed=4), _rand(batch, weight_channels, k * k, h * w, seed=5)
    top = _rand(batch, 8, h, w, seed=6)
    out = ops_triton.aggregation(x.to(device), weight.to(device), k)
    _close(out, aggregation_loop(x.numpy(), weight.numpy(), k, repeat_reflect=True))
    grad_x, grad_weight = ops_triton.aggregation_backward(top.to(device), x.to(device), weight.to(device), k)
    if (k, h, w, batch) in DEFINED:
        ref_x, ref_weight = aggregation_backward_loop(top.numpy(), x.numpy(), weight.numpy(), k)
    else:
        # autograd of the reference's unfold aggregation (weight channel c % Cw), repeated reflection
        xr, wr = x.clone().requires_grad_(), weight.clone().requires_grad_()
        neighbours = _neighbours(xr, k, repeated_reflect_pad).view(batch, -1, weight_channels, k * k, h * w)
        (wr.unsqueeze(1) * neighbours).sum(3).view(batch, 8, h, w).backward(top)
        ref_x, ref_weight = xr.grad, wr.grad
    _close(grad_x, ref_x)
    _close(grad_weight, ref_weight)
    only_x = ops_triton.aggregation_backward(top.to(device), x.to(device), weight.to(device), k, need_weight=False)
    assert only_x[1] is None and torch.equal(only_x[0], grad_x)


def _sam_module(sa_type: str, planes: int, kernel_size: int, seed: int, share_planes: int = 8):
    from timm_san.sam import SelfAttention
    from reference import randomize_
    module = SelfAttention(sa_type, planes, max(1, planes // 16), planes // 4, share_planes=share_planes,
                           kernel_size=kernel_size)
    return randomize_(module, seed=seed).double().eval()


@kernels
@pytest.mark.parametrize('sa_type', ['pairwise', 'patchwise'])
@pytest.mark.parametrize('planes,share,k,h,w,batch', [
    (32, 8, 3, 5, 6, 2), (64, 8, 7, 9, 10, 1), (32, 8, 7, 3, 4, 2), (48, 6, 5, 1, 6, 1)])
@pytest.mark.parametrize('dtype', [torch.float64, torch.float32])
def test_fused_eval_attention_equals_the_reference(sa_type, planes, share, k, h, w, batch, dtype, device):
    # the whole SAM after its convs in one kernel (online softmax for pairwise): against the reference operator,
    # on maps where one reflection suffices and where it repeats (3x4 and 1x6 with k = 7, 5); 48 channels shared
    # by 6: 6 groups of channels per weight channel, padded to 8 in the kernel
    from timm_san.kernels.common import fold_mapping
    module = _sam_module(sa_type, planes, k, seed=7, share_planes=share).to(dtype)
    x = _rand(batch, planes, h, w, seed=8, dtype=dtype)
    with ops.use_kernels('reference'), torch.no_grad():
        expected = module(x)
    params = [module.conv1, module.conv2, module.conv3]
    x1, x2, x3 = (torch.nn.functional.conv2d(x, c.weight, c.bias) for c in params)
    bn1, map1, bn2, map2 = module.conv_w[0], module.conv_w[2], module.conv_w[3], module.conv_w[5]
    mapping = [bn1.weight, bn1.bias, bn1.running_mean, bn1.running_var, map1.weight, map1.bias, bn2.weight,
               bn2.bias, bn2.running_mean, bn2.running_var, map2.weight, map2.bias]
    folded = [t.detach() for t in fold_mapping(mapping, bn1.eps, bn2.eps)]
    with torch.no_grad():
        if sa_type == 'pairwise':
            position = module.conv_p(ops.position_grid(x))
            out = ops_triton.pairwise_eval(x1.to(device), x2.to(device), x3.to(device), position.to(device),
                                           [t.to(device) for t in folded], k)
        else:
            out = ops_triton.patchwise_eval(x1.to(device), x2.to(device), x3.to(device),
                                            [t.to(device) for t in folded], k)
    tolerance = 1e-10 if dtype == torch.float64 else 1e-5
    _close(out, expected, atol=tolerance, rtol=tolerance)


@kernels
@pytest.mark.parametrize('dtype,weight_dtype', [
    (torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32), (torch.float16, torch.float16)])
def test_low_precision_matches_the_pytorch_operators(dtype, weight_dtype, device):
    # bf16 autocast hands aggregation bf16 maps and float32 softmax weights: outputs and gradients keep the
    # dtypes of their inputs; values agree with the PyTorch operators up to the rounding of the outputs
    k, h, w, batch = 3, 5, 6, 3
    x1, x2 = _rand(batch, 8, h, w, seed=1, dtype=dtype), _rand(batch, 8, h, w, seed=2, dtype=dtype)
    weight = _rand(batch, 2, k * k, h * w, seed=3, dtype=weight_dtype) / k
    top = _rand(batch, 8, k * k, h * w, seed=4, dtype=dtype)
    top_agg = _rand(batch, 8, h, w, seed=5, dtype=dtype)
    tol = dict(atol=2e-2, rtol=1e-2)

    def check(actual, expected):
        assert actual.dtype == expected.dtype
        _close(actual, expected.double(), **tol)

    dev = [t.to(device) for t in (x1, x2, weight, top, top_agg)]
    check(ops_triton.subtraction2(dev[0], dev[1], k), reference.subtraction2(x1, x2, k))
    check(ops_triton.footprint(dev[1], k), reference.footprint(x2, k))
    check(ops_triton.aggregation(dev[1], dev[2], k), reference.aggregation(x2.double(), weight.double(), k).to(dtype))
    check(ops_triton.offset_sum(dev[3], h, w, dtype), top.sum(2).reshape(batch, 8, h, w))
    check(ops_triton.footprint_backward(dev[3], h, w, k, dtype, negate=True),
          -reference.footprint_backward(top.double(), h, w, k).to(dtype))
    grad_x, grad_weight = ops_triton.aggregation_backward(dev[4], dev[1], dev[2], k)
    check(grad_x, reference.aggregation_input_grad(top_agg.double(), weight.double(), k).to(dtype))
    check(grad_weight, reference.aggregation_weight_grad(x2.double(), top_agg.double(), 2, k).to(weight_dtype))


@kernels
def test_non_contiguous_inputs(device):
    k, batch = 3, 2
    x = _rand(batch, 8, 6, 7, seed=1).transpose(2, 3)  # (B, C, 7, 6) with swapped strides
    weight = _rand(batch, 6 * 7, 4, k * k, seed=2).permute(0, 2, 3, 1)
    top = _rand(batch, 8, 6, 7, seed=3).transpose(2, 3)
    _close(ops_triton.aggregation(x.to(device), weight.to(device), k), reference.aggregation(x, weight, k))
    _close(ops_triton.subtraction2(x.to(device), x.flip(1).to(device), k), reference.subtraction2(x, x.flip(1), k))
    grad_x, grad_weight = ops_triton.aggregation_backward(top.to(device), x.to(device), weight.to(device), k)
    _close(grad_x, reference.aggregation_input_grad(top.contiguous(), weight, k))
    _close(grad_weight, reference.aggregation_weight_grad(x, top, 4, k))


def _kernels_named(caplog) -> list:
    return [r.getMessage() for r in caplog.records if r.name == 'timm_san.ops']


def test_cpu_tensors_take_the_reference_operators(caplog):
    caplog.set_level(logging.DEBUG, logger='timm_san.ops')
    x = _rand(1, 4, 5, 5).requires_grad_()
    weight = _rand(1, 2, 9, 25).requires_grad_()
    (ops.aggregation(x, weight, 3).sum() + ops.subtraction(x, 3).sum() + ops.footprint(x, 3).sum()).backward()
    named = _kernels_named(caplog)
    assert named and not any('triton' in message for message in named)


def _public_calls(x1, x2, weight, k, upstream_dtype):
    """Output and input gradients of every public operator, each on leaves of its own; the upstream gradients
    are the same random values (rounded to ``upstream_dtype``) whatever the dtype of the inputs."""
    calls = [
        (ops.subtraction2, (x1, x2)), (ops.subtraction, (x2,)), (ops.footprint, (x1,)), (ops.aggregation, (x2, weight))]
    results = []
    for seed, (op, inputs) in enumerate(calls):
        leaves = [t.detach().clone().requires_grad_() for t in inputs]
        out = op(*leaves, k)
        out.backward(_rand(*out.shape, seed=seed).to(upstream_dtype).to(out))
        results += [out.detach()] + [t.grad for t in leaves]
    return results


@cuda_only
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_public_operators_dispatch_to_triton_on_cuda(dtype, caplog):
    k, h, w = 7, 9, 11
    x1, x2 = _rand(2, 16, h, w, seed=1).cuda().to(dtype), _rand(2, 16, h, w, seed=2).cuda().to(dtype)
    weight = torch.softmax(_rand(2, 4, k * k, h * w, seed=3).cuda().float(), dim=2)  # float32, as under autocast
    caplog.set_level(logging.DEBUG, logger='timm_san.ops')
    triton_results = _public_calls(x1, x2, weight, k, dtype)
    named = [m.split(':')[0] for m in _kernels_named(caplog) if 'triton kernel' in m]
    assert sorted(named) == sorted([
        'subtraction2', 'subtraction', 'footprint', 'aggregation', 'offset_sum', 'footprint_backward',
        'footprint_backward', 'footprint_backward', 'aggregation_backward'])
    caplog.clear()
    with ops.use_kernels('reference'):
        torch_results = _public_calls(x1, x2, weight, k, dtype)
    # values against float64: in bf16 the reference rounds its accumulator at every offset, the kernels once at
    # the end
    reference_results = _public_calls(x1.double(), x2.double(), weight.double(), k, dtype)
    assert not any('triton kernel' in m for m in _kernels_named(caplog))
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=1e-2)
    for ours, theirs, exact in zip(triton_results, torch_results, reference_results):
        assert ours.dtype == theirs.dtype
        torch.testing.assert_close(ours.double(), exact, **tol)


@cuda_only
def test_compiled_graph_calls_the_operators_on_cuda(caplog):
    x = _rand(2, 8, 6, 6).cuda().float()
    weight = _rand(2, 2, 9, 36).cuda().float()
    torch._dynamo.reset()
    compiled = torch.compile(lambda a, b: ops.aggregation(a, b, 3))
    caplog.set_level(logging.DEBUG, logger='timm_san.ops')
    torch.testing.assert_close(compiled(x, weight), reference.aggregation(x, weight, 3))
    assert any(m.startswith('aggregation: triton kernel') for m in _kernels_named(caplog))


@cuda_only
def test_offsets_beyond_int32_on_cuda():
    # a footprint of 2**31 + elements: the last channel must land where the PyTorch operator puts it
    if torch.cuda.get_device_properties(0).total_memory < 24 * 2 ** 30:
        pytest.skip('needs 24 GiB of GPU memory')
    k, h, w, channels = 7, 64, 64, 10800  # 10800 * 49 * 4096 > 2**31
    x = torch.randn(1, channels, h, w, device='cuda', dtype=torch.float16)
    out = ops_triton.footprint(x, k)
    torch.testing.assert_close(out[:, -2:], reference.footprint(x[:, -2:], k), rtol=0, atol=0)
    del out
    weight = torch.randn(1, channels, k * k, h * w, device='cuda', dtype=torch.float16)
    out = ops_triton.aggregation(x, weight, k)
    torch.testing.assert_close(
        out[:, -2:].float(), reference.aggregation(x[:, -2:].float(), weight[:, -2:].float(), k), atol=2e-2, rtol=1e-2)


@cuda_only
@pytest.mark.parametrize('name', ['san10_pairwise', 'san10_patchwise'])
def test_cuda_eval_model_runs_the_fused_kernel(name, caplog):
    # eval on CUDA: every SAM one fused Triton kernel, equal to the reference within float32 rounding
    import timm
    from reference import randomize_
    model = randomize_(timm.create_model(name, num_classes=10), seed=9).cuda().eval()
    x = _rand(2, 3, 64, 64, seed=10, dtype=torch.float32).cuda()
    caplog.set_level(logging.DEBUG, logger='timm_san.ops')
    with torch.no_grad():
        out = model(x)
        attention = [m for m in _kernels_named(caplog) if 'attention' in m.split(':')[0]]
        assert len(attention) == 10 and all(': triton kernel' in m for m in attention), attention
        with ops.use_kernels('reference'):
            expected = model(x)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
