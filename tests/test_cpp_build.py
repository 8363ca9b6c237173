"""How the compiled CPU kernels are built, cached and loaded, in fresh interpreters with a cache folder of their own.

One cold build (two processes started together on an empty cache: one compiles, the other waits for it), then
a process that finds the cache warm; and a compiler that fails, whose message reaches the log while the cpu
backend runs. The kernels' arithmetic is tested elsewhere (test_attention_kernels.py, test_pointwise_ops.py).
"""
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# one eval forward of a small SAN (the model's name filled in), the dispatch's debug log and warnings on stdout
_FORWARD = """
import logging, sys, time
import torch, timm
import timm_san
logging.basicConfig(stream=sys.stdout, format='%(name)s %(levelname)s %(message)s', level=logging.WARNING)
logging.getLogger('timm_san.ops').setLevel(logging.DEBUG)
model = timm.create_model('{model}', num_classes=10).eval()
with torch.no_grad():
    model(torch.randn(1, 3, 32, 32))
"""


def _start(cache, **env_changes):
    env = dict(os.environ, TIMM_SAN_CPP_CACHE=str(cache), **env_changes)
    return subprocess.Popen([sys.executable, '-c', _FORWARD.format(model='san10_pairwise')], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(process):
    try:
        stdout, stderr = process.communicate(timeout=300)
    finally:
        process.kill()
    assert process.returncode == 0, stderr
    return stdout, stderr


def _attention_kernels(stdout: str) -> set:
    return {line.split(': ')[1].split(' kernel')[0] for line in stdout.splitlines() if 'pairwise_attention:' in line}


def test_cold_cache_builds_once_then_loads(tmp_path):
    first, second = _start(tmp_path), _start(tmp_path)
    outputs = [_finish(first), _finish(second)]
    builds = [err for _, err in outputs if 'timm-san: compiling the C++ CPU kernels' in err]
    assert len(builds) == 1, [err for _, err in outputs]  # the other process waited on the lock, then loaded
    assert 'timm-san: compiled the C++ CPU kernels in' in builds[0]
    assert all(_attention_kernels(out) == {'cpp'} for out, _ in outputs)
    libraries = list(tmp_path.rglob('timm_san_cpp.so'))
    assert len(libraries) == 1 and not list(tmp_path.rglob('*.so.*')), libraries  # nothing half-written is left
    # warm: loaded, nothing printed
    out, err = _finish(_start(tmp_path))
    assert 'compiling' not in err and _attention_kernels(out) == {'cpp'}


def test_a_failing_compiler_falls_back_and_says_why(tmp_path):
    out, err = _finish(_start(tmp_path / 'cache', CXX='false'))  # a "compiler" that exits 1 without output
    warnings = [ln for ln in out.splitlines() if 'WARNING' in ln]
    assert len(warnings) == 1 and 'the compiler failed' in warnings[0], out
    assert _attention_kernels(out) == {'cpu'}
    assert all('cpp unavailable: the compiler failed' in ln for ln in out.splitlines() if 'attention:' in ln)
    assert not list((tmp_path / 'cache').rglob('*.so'))


def test_kernels_command_reports_and_builds(tmp_path):
    env = dict(os.environ, TIMM_SAN_CPP_CACHE=str(tmp_path))
    report = subprocess.run([sys.executable, '-m', 'timm_san', 'kernels'], env=env, capture_output=True, text=True,
                            timeout=120)
    assert report.returncode == 0, report.stderr
    assert 'backends allowed: cpp, cpu, triton' in report.stdout
    assert 'not built yet for this machine' in report.stdout
    assert not list(tmp_path.rglob('*.so'))  # reporting builds nothing


def test_without_a_compiler_the_cpu_backend_runs_and_the_log_says_why(tmp_path):
    # no compiler on PATH, an empty cache: the dispatch falls back, warns once, and names the reason in its log
    env = dict(os.environ, PATH=str(tmp_path), TIMM_SAN_CPP_CACHE=str(tmp_path / 'cache'))
    env.pop('CXX', None)
    result = subprocess.run([sys.executable, '-c', _FORWARD.format(model='san10_patchwise')], env=env, cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    warnings = [ln for ln in lines if 'WARNING' in ln]
    assert len(warnings) == 1 and 'no C++ compiler found' in warnings[0], warnings
    attention = [ln for ln in lines if 'patchwise_attention:' in ln]
    assert len(attention) == 10
    assert all('cpu kernel' in ln and 'cpp unavailable: no C++ compiler found' in ln for ln in attention), attention
    assert not (tmp_path / 'cache').exists() or not any((tmp_path / 'cache').rglob('*.so'))
