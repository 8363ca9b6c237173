""" Compile the C++ CPU kernels once per machine and cache them on disk

The kernels (``csrc/``) are built on PyTorch's stable ABI (``torch/csrc/stable``) for the CPU they run on
(``-march=native``), the first time a process needs them, and kept in a cache folder keyed by everything the build
depends on (sources, compiler, flags, torch, CPU): a later process loads the cached library in milliseconds. What a
build needs is a C++17 compiler (``$CXX``, else ``c++``, ``g++`` or ``clang++``) and torch 2.10 or newer, whose
headers ship in its wheel. Without them the kernels are unavailable, the dispatch says why in its debug log, and the
``cpu`` backend's kernels run instead.

    TIMM_SAN_CPP_CACHE    the cache folder (default ``$XDG_CACHE_HOME/timm-san/kernels``, ``~/.cache/...``)
    TIMM_SAN_CPP_DEFINES  extra preprocessor symbols, comma-separated: ``SAN_PROFILE`` (per-phase cycle counters,
                          ``benchmarks/profile_kernels.py``), ``SAN_POISON`` (scratch filled with NaN, for tests)

A build prints one line to stderr when it starts and one when it ends; concurrent processes (``torchrun``) wait for
the first one's build instead of compiling again.
"""
import contextlib
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator, List, Optional

import torch

__all__ = ['library', 'unavailable_reason', 'built', 'cache_dir', 'build_command', 'MIN_TORCH']

_logger = logging.getLogger('timm_san.ops')

MIN_TORCH = (2, 10)  # torch::stable::parallel_for and std::vector arguments
_NAMESPACE = 'timm_san_cpp'
_SOURCES = Path(__file__).parent / 'csrc'
_MAIN = 'ops.cpp'
_TARGET_VERSION = '(((0ULL + 2) << 56) | ((0ULL + 10) << 48))'

_loaded: Optional[bool] = None  # None: not tried yet in this process
_reason = ''


def cache_dir() -> Path:
    """The folder cached builds live in."""
    env = os.environ.get('TIMM_SAN_CPP_CACHE')
    if env:
        return Path(env)
    base = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
    return Path(base) / 'timm-san' / 'kernels'


def _compiler() -> Optional[str]:
    for name in (os.environ.get('CXX'), 'c++', 'g++', 'clang++'):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _defines() -> List[str]:
    return sorted(d.strip() for d in os.environ.get('TIMM_SAN_CPP_DEFINES', '').split(',') if d.strip())


def build_command(compiler: str, source: Path, output: Path) -> List[str]:
    """The compiler's command line for the library."""
    torch_dir = Path(torch.__file__).parent
    return [
        compiler, str(source), '-o', str(output), '-shared', '-fPIC', '-std=c++17', '-O3', '-march=native',
        '-fvisibility=hidden', f'-I{torch_dir / "include"}', f'-DTORCH_TARGET_VERSION={_TARGET_VERSION}',
        *[f'-D{d}' for d in _defines()],
        f'-L{torch_dir / "lib"}', '-ltorch_cpu', '-lc10', f'-Wl,-rpath,{torch_dir / "lib"}',
    ]


def _cpu_signature() -> str:
    """What -march=native depends on: the CPU's model and instruction sets (a shared cache may span machines)."""
    try:
        info = Path('/proc/cpuinfo').read_text()
        lines = [ln for ln in info.splitlines() if ln.startswith(('model name', 'flags', 'Features', 'CPU part'))]
        return '\n'.join(sorted(set(lines)))
    except OSError:
        return platform.processor()


def _key(compiler: str) -> str:
    digest = hashlib.sha256()
    for path in sorted(_SOURCES.iterdir()):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    version = subprocess.run([compiler, '--version'], capture_output=True, text=True).stdout
    for part in (version, torch.__version__, str(Path(torch.__file__).parent), platform.machine(), _cpu_signature(),
                 ' '.join(_defines()), _TARGET_VERSION):
        digest.update(part.encode())
    return digest.hexdigest()[:16]


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock on a file (POSIX), so that concurrent processes build once."""
    try:
        import fcntl
    except ImportError:  # no fcntl (Windows): builds may run side by side; the rename below stays atomic
        yield
        return
    with open(path, 'a+') as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _build(compiler: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        partial = Path(tmp) / target.name
        command = build_command(compiler, _SOURCES / _MAIN, partial)
        print(f'timm-san: compiling the C++ CPU kernels for this machine (once per machine, about 20 s) '
              f'into {target.parent}', file=sys.stderr, flush=True)
        start = time.perf_counter()
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            lines = (result.stderr or result.stdout).strip().splitlines()
            errors = [ln for ln in lines if 'error' in ln] or lines
            raise RuntimeError(f'the compiler failed: {errors[0] if errors else "no output"}')
        os.replace(partial, target)  # atomic: a concurrent reader sees no half-written library
        print(f'timm-san: compiled the C++ CPU kernels in {time.perf_counter() - start:.0f} s', file=sys.stderr,
              flush=True)


def _target() -> Path:
    """Where this machine's build lives; an error that says why there can be none."""
    if tuple(int(p) for p in torch.__version__.split('+')[0].split('.')[:2]) < MIN_TORCH:
        raise RuntimeError(f'torch {torch.__version__} is older than {".".join(map(str, MIN_TORCH))} (the stable ABI '
                           f'the kernels are built on)')
    compiler = _compiler()
    if compiler is None:
        raise RuntimeError('no C++ compiler found (set CXX, or install g++ or clang++)')
    return cache_dir() / _key(compiler) / f'{_NAMESPACE}.so'


def built() -> Optional[Path]:
    """The cached library for this machine, torch and sources, if it has been built (None otherwise)."""
    try:
        target = _target()
    except RuntimeError:
        return None
    return target if target.exists() else None


def _load() -> None:
    target = _target()
    folder = target.parent
    if not target.exists():
        folder.mkdir(parents=True, exist_ok=True)
        with _locked(folder / 'build.lock'):
            if not target.exists():  # another process may have built it while this one waited
                _build(_compiler(), target)
    torch.ops.load_library(str(target))


def library() -> bool:
    """Whether the compiled kernels are loaded, building them on the first call of the process if need be."""
    global _loaded, _reason
    if _loaded is None:
        try:
            _load()
            _loaded = True
        except Exception as error:  # any failure leaves the other kernels to run, and says why
            _loaded, _reason = False, str(error)
            _logger.warning('timm-san: the C++ CPU kernels are unavailable (%s); the cpu backend runs instead.',
                            _reason)
    return _loaded


def unavailable_reason() -> str:
    """Why ``library()`` is False ('' while it is True or not yet tried)."""
    return _reason
