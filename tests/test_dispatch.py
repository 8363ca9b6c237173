"""The switch that picks the operators' kernels: ``set_kernels``, ``use_kernels``, ``TIMM_SAN_KERNELS`` and
``select_kernel``, seen through the dispatch's debug log and through what the models compute."""
import os
import subprocess
import sys

import pytest
import torch
import timm

import timm_san  # noqa: F401
from timm_san import ops
from timm_san.sam import SelfAttention
from reference import randomize_

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _rand(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.fixture(autouse=True)
def all_kernels():
    """Every test starts from the default setting ('all') and leaves the process's setting as it found it."""
    previous = ops.enabled_kernels()
    ops.set_kernels('all')
    yield
    ops.set_kernels(sorted(previous) or 'reference')


def _sam_eval(sa_type: str = 'pairwise') -> None:
    """One eval call of a small SAM on CPU in float32."""
    module = SelfAttention(sa_type, 16, 2, 8, share_planes=4, kernel_size=3).eval()
    with torch.no_grad():
        module(_rand(2, 16, 5, 6, seed=1))


# --- use_kernels

@pytest.mark.parametrize('sa_type', ['pairwise', 'patchwise'])
def test_default_on_cpu_float32_eval_is_the_compiled_kernel(sa_type, kernels_run):
    _sam_eval(sa_type)
    assert kernels_run() == [[f'{sa_type}_attention', 'cpp']]


def test_use_kernels_reference_for_a_block(kernels_run):
    with ops.use_kernels('reference'):
        assert ops.enabled_kernels() == frozenset()
        _sam_eval()
        assert kernels_run() == [['pairwise_attention', 'reference']]
    assert ops.enabled_kernels() == frozenset(ops.BACKENDS)
    _sam_eval()
    assert kernels_run() == [['pairwise_attention', 'cpp']]


def test_use_kernels_restores_the_setting_after_an_exception(kernels_run):
    ops.set_kernels('triton')
    with pytest.raises(KeyError, match='inside the block'):
        with ops.use_kernels('reference'):
            raise KeyError('inside the block')
    assert ops.enabled_kernels() == frozenset({'triton'})
    with pytest.raises(ValueError):
        with ops.use_kernels('cpu'):
            with ops.use_kernels('gpu'):
                pass  # pragma: no cover
    assert ops.enabled_kernels() == frozenset({'triton'})
    _sam_eval()  # triton does not apply to CPU tensors
    assert kernels_run() == [['pairwise_attention', 'reference']]


def test_use_kernels_nests():
    with ops.use_kernels('cpu'):
        with ops.use_kernels('reference'):
            assert ops.enabled_kernels() == frozenset()
        assert ops.enabled_kernels() == frozenset({'cpu'})
    assert ops.enabled_kernels() == frozenset(ops.BACKENDS)


# --- set_kernels

@pytest.mark.parametrize('spec,enabled', [
    ('all', {'cpp', 'cpu', 'triton'}), ('reference', set()), ('cpu', {'cpu'}), ('cpp', {'cpp'}),
    ('triton', {'triton'}), ('cpu,triton', {'cpu', 'triton'}), ('triton, cpu', {'cpu', 'triton'}),
    (['triton'], {'triton'}), (('cpu', 'triton'), {'cpu', 'triton'}), ('CPU', {'cpu'}), ('cpp,cpu', {'cpp', 'cpu'}),
])
def test_set_kernels_accepts(spec, enabled):
    ops.set_kernels('reference' if enabled else 'all')  # a change to see
    ops.set_kernels(spec)
    assert ops.enabled_kernels() == frozenset(enabled)


@pytest.mark.parametrize('spec,bad', [
    ('gpu', 'gpu'), ('cuda', 'cuda'), ('cpu,gpu', 'gpu'), ('triton;cpu', 'triton;cpu'), (['cpu', 'mps'], 'mps'),
])
def test_set_kernels_refuses(spec, bad):
    ops.set_kernels('cpu')
    with pytest.raises(ValueError) as info:
        ops.set_kernels(spec)
    message = str(info.value)
    assert repr(bad) in message
    for allowed in ('"all"', '"reference"', 'cpp', 'cpu', 'triton'):
        assert allowed in message
    assert ops.enabled_kernels() == frozenset({'cpu'})  # unchanged


def test_set_kernels_cpu_only_chooses_the_cpu_kernel(kernels_run):
    ops.set_kernels('cpu')
    _sam_eval('patchwise')
    assert kernels_run() == [['patchwise_attention', 'cpu']]
    ops.set_kernels('reference')
    _sam_eval('patchwise')
    assert kernels_run() == [['patchwise_attention', 'reference']]


# --- TIMM_SAN_KERNELS

_SUBPROCESS = """
import logging, sys
import torch, timm
import timm_san
logging.basicConfig(stream=sys.stdout, format='%(name)s %(message)s', level=logging.WARNING)
logging.getLogger('timm_san.ops').setLevel(logging.DEBUG)
print('enabled', sorted(timm_san.ops.enabled_kernels()))
model = timm.create_model('san10_pairwise', num_classes=10).eval()
with torch.no_grad():
    model(torch.randn(1, 3, 32, 32))
"""


_ENV_VALUES = {'reference': 'reference', 'unset': None, 'invalid': 'cpu,gpu'}


@pytest.fixture(scope='module')
def runs_with_env():
    """``{case: (returncode, stdout, stderr)}`` of the script above in fresh interpreters, ``TIMM_SAN_KERNELS`` set
    to each of ``_ENV_VALUES`` (unset for None); started together, as each spends seconds importing."""
    processes = {}
    for case, value in _ENV_VALUES.items():
        env = {k: v for k, v in os.environ.items() if k != 'TIMM_SAN_KERNELS'}
        if value is not None:
            env['TIMM_SAN_KERNELS'] = value
        processes[case] = subprocess.Popen(
            [sys.executable, '-c', _SUBPROCESS], env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True)
    results = {}
    for case, process in processes.items():
        try:
            stdout, stderr = process.communicate(timeout=120)
        finally:
            process.kill()
        results[case] = process.returncode, stdout, stderr
    return results


def _attention_kernels(stdout: str) -> list:
    return [line.split(': ')[1].split(' kernel')[0] for line in stdout.splitlines()
            if line.startswith('timm_san.ops pairwise_attention: ')]


@pytest.mark.parametrize('case,enabled,kernel', [
    ('reference', [], 'reference'), ('unset', ['cpp', 'cpu', 'triton'], 'cpp')])
def test_environment_variable_chooses_the_kernels(runs_with_env, case, enabled, kernel):
    returncode, stdout, stderr = runs_with_env[case]
    assert returncode == 0, stderr
    assert f'enabled {enabled}' in stdout.splitlines()
    assert _attention_kernels(stdout) == [kernel] * 10  # san10: 10 attention modules


def test_invalid_environment_variable_fails_the_import(runs_with_env):
    returncode, stdout, stderr = runs_with_env['invalid']
    assert returncode != 0
    assert 'enabled' not in stdout  # the import failed
    last = stderr.strip().splitlines()[-1]
    assert last.startswith('ValueError: Unknown SAN kernel backend(s)'), last
    assert "'gpu'" in last and 'TIMM_SAN_KERNELS' in last and '"reference"' in last, last


# --- select_kernel

@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
def test_select_cpp_then_cpu_for_cpu_eval_and_float_training(dtype):
    x = torch.ones(1, 2, 3, 3, dtype=dtype)
    assert ops.select_kernel('op', x) == 'cpp'
    assert ops.select_kernel('op', x, training=True) == 'cpp'
    assert ops.select_kernel('op', x, training=True, backends=('cpu',)) == 'cpu'
    with ops.use_kernels('cpu'):
        assert ops.select_kernel('op', x) == 'cpu'


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
def test_select_reference_for_half_precision_training_on_cpu(dtype):
    x = torch.ones(1, 2, 3, 3, dtype=dtype)
    assert ops.select_kernel('op', x, training=True) == 'reference'
    assert ops.select_kernel('op', x) == 'cpu'  # eval: any floating dtype


@pytest.mark.parametrize('x', [
    torch.ones(0, 2, 3, 3), torch.ones(2, 2, 0, 3), torch.ones(1, 2, 3, 3, device='meta'),
    torch.ones(1, 2, 3, 3, dtype=torch.int64), torch.ones(1, 2, 3, 3, dtype=torch.uint8),
], ids=['empty-batch', 'empty-map', 'meta', 'int64', 'uint8'])
def test_select_reference_where_no_backend_applies(x):
    assert ops.select_kernel('op', x) == 'reference'
    assert ops.select_kernel('op', x, training=True) == 'reference'


def test_select_respects_the_switch_and_the_operators_backends(kernels_run):
    x = torch.ones(1, 2, 3, 3)
    assert ops.select_kernel('op', x, backends=()) == 'reference'
    assert ops.select_kernel('op', x, backends=('triton',)) == 'reference'  # a CPU tensor
    with ops.use_kernels('triton'):
        assert ops.select_kernel('op', x) == 'reference'
    with ops.use_kernels('reference'):
        assert ops.select_kernel('op', x) == 'reference'
    kernels_run()
    ops.select_kernel('my_op', x, training=True)
    assert kernels_run('my_op') == [['my_op', 'cpp']]


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
def test_select_triton_only_for_cuda_tensors():
    from timm_san.kernels.triton import AVAILABLE
    x = torch.ones(1, 2, 3, 3, device='cuda')
    assert ops.select_kernel('op', x) == ('triton' if AVAILABLE else 'reference')
    assert ops.select_kernel('op', x, backends=('cpu',)) == 'reference'
    with ops.use_kernels('cpu'):
        assert ops.select_kernel('op', x) == 'reference'
    assert ops.select_kernel('op', torch.ones(0, 2, 3, 3, device='cuda')) == 'reference'
    assert ops.select_kernel('op', x.to(torch.int64)) == 'reference'


# --- the kernels compute the same

@pytest.mark.parametrize('name', ['san10_pairwise', 'san10_patchwise'])
def test_cpu_backends_and_reference_kernels_agree_in_float64(name, kernels_run, backend):
    model = randomize_(timm.create_model(name, num_classes=10), seed=5).double().eval()
    x = _rand(2, 3, 64, 32, seed=6, dtype=torch.float64)
    with torch.no_grad():
        out = model(x)
        assert {kernel for _, kernel in kernels_run()} == {backend}
        with ops.use_kernels('reference'):
            expected = model(x)
        assert {kernel for _, kernel in kernels_run()} == {'reference'}
    error = ((out - expected).abs().max() / expected.abs().max()).item()
    assert error < 1e-9, error
