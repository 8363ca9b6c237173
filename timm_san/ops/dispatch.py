""" The one place that decides which kernel computes a SAN operator

Every operator of ``timm_san.ops`` has a reference kernel (plain PyTorch, ``timm_san.kernels.reference``: the
spec, on every device and dtype) and may have faster ones per backend:

    ``cpp``     the compiled loops of ``timm_san.kernels.cpp`` (the attention, CPU tensors of float32/float64, eval
                and training); built on first use, and unavailable without a C++ compiler or before torch 2.10
    ``cpu``     the fused loops of ``timm_san.kernels.cpu`` (CPU tensors; eval and, in float32/float64, training)
    ``triton``  the Triton kernels of ``timm_san.kernels.triton`` (CUDA tensors of float16/bfloat16/float32/float64)

``select_kernel`` is asked once per operator call, from inside the operator's kernel (so under ``torch.compile``,
``torch.export`` and ``torch.jit.trace`` the choice is made when the graph runs, not when it is captured). It
takes the first backend that is enabled and applies to the inputs, else the reference; the logger
``timm_san.ops`` names the kernel at DEBUG level, and why an enabled backend that applies could not run.

Which backends may run is one switch, in the style of timm's ``set_fused_attn``:

    * the environment variable ``TIMM_SAN_KERNELS`` at import: ``all`` (the default), ``reference`` (no backend),
      or a comma-separated list of the backends allowed (``cpp``, ``cpu``, ``triton``);
    * ``set_kernels(...)`` with the same values, for the process;
    * ``with use_kernels('reference'):`` for a block, restoring the setting after it.

Exporting to ONNX always takes the reference, written out of standard operators: ONNX has no SAN operators.
"""
import contextlib
import functools
import logging
import os
from typing import Callable, FrozenSet, Iterable, Iterator, Union

import torch

__all__ = [
    'BACKENDS', 'set_kernels', 'use_kernels', 'enabled_kernels', 'select_kernel', 'inline_reference',
    'autocast_enabled', 'outside_autocast',
]

_logger = logging.getLogger('timm_san.ops')

BACKENDS = ('cpp', 'cpu', 'triton')
_ENV = 'TIMM_SAN_KERNELS'
# dtypes each backend computes in; training on CPU also needs float32/float64 (its sums run in the tensors' dtype)
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_CPU_TRAIN_DTYPES = (torch.float32, torch.float64)
_CPP_DTYPES = (torch.float32, torch.float64)

KernelSpec = Union[None, str, Iterable[str]]


def _parse(spec: KernelSpec) -> FrozenSet[str]:
    """The set of backends a ``TIMM_SAN_KERNELS`` / ``set_kernels`` value allows; a clear error for anything else."""
    if spec is None:
        spec = 'all'
    names = [s.strip() for s in spec.split(',')] if isinstance(spec, str) else [str(s).strip() for s in spec]
    names = [n.lower() for n in names if n]
    if names in ([], ['all']):  # an empty TIMM_SAN_KERNELS is an unset one
        return frozenset(BACKENDS)
    if names == ['reference']:
        return frozenset()
    unknown = [n for n in names if n not in BACKENDS]
    if unknown:
        raise ValueError(
            f'Unknown SAN kernel backend(s) {unknown} in {spec!r}: use "all" or "reference" alone, or a '
            f'comma-separated list of {", ".join(BACKENDS)} (set through {_ENV} or timm_san.ops.set_kernels).')
    return frozenset(names)


_enabled: FrozenSet[str] = _parse(os.environ.get(_ENV, 'all'))


def set_kernels(spec: KernelSpec = 'all') -> None:
    """Choose which backends may run: ``'all'``, ``'reference'``, or backends such as ``'cpu'`` / ``['triton']``.

    Args:
        spec: The backends allowed, as ``TIMM_SAN_KERNELS`` takes them.
    """
    global _enabled
    _enabled = _parse(spec)


def enabled_kernels() -> FrozenSet[str]:
    """The backends currently allowed (empty: reference kernels only)."""
    return _enabled


@contextlib.contextmanager
def use_kernels(spec: KernelSpec) -> Iterator[None]:
    """Within the block, allow only these backends (``'reference'`` forces the reference kernels).

    Args:
        spec: The backends allowed, as ``set_kernels`` takes them.
    """
    global _enabled
    previous, _enabled = _enabled, _parse(spec)
    try:
        yield
    finally:
        _enabled = previous


def _triton_available() -> bool:
    from ..kernels.triton import AVAILABLE
    return AVAILABLE


def _cpp_available() -> bool:
    from ..kernels import cpp
    return cpp.library()


def _cpp_reason() -> str:
    from ..kernels import cpp
    return cpp.unavailable_reason()


def select_kernel(op: str, x: torch.Tensor, training: bool = False, backends: Iterable[str] = BACKENDS,
                  note: str = '') -> str:
    """The kernel that computes ``op`` on input ``x``: ``'triton'``, ``'cpu'`` or ``'reference'``.

    Args:
        op: Operator name, for the log.
        x: The operator's main input (its device and dtype decide).
        training: Whether the call normalises with batch statistics (the CPU backend then needs float32/float64).
        backends: The backends that implement ``op``.
        note: Why ``backends`` is narrower than usual, for the log.

    Returns:
        The first backend of ``backends`` that is enabled and applies to ``x``, else ``'reference'`` (also for
        an empty batch, which the reference returns as PyTorch's own layers do).
    """
    kernel = 'reference'
    device = x.device.type
    skipped = ''
    cpp_applies = 'cpp' in backends and 'cpp' in _enabled and device == 'cpu' and x.dtype in _CPP_DTYPES
    if x.numel() == 0:
        pass
    elif cpp_applies and _cpp_available():
        kernel = 'cpp'
    elif 'triton' in backends and 'triton' in _enabled and device == 'cuda' and x.dtype in _TRITON_DTYPES \
            and _triton_available():
        kernel = 'triton'
    elif 'cpu' in backends and 'cpu' in _enabled and device == 'cpu' and x.is_floating_point() \
            and (not training or x.dtype in _CPU_TRAIN_DTYPES):
        kernel = 'cpu'
    if cpp_applies and kernel != 'cpp' and x.numel():
        skipped = f'; cpp unavailable: {_cpp_reason()}'
    if _logger.isEnabledFor(logging.DEBUG):
        _logger.debug('%s: %s kernel (%s, %s%s%s%s)', op, kernel, device, x.dtype, ', training' if training else '',
                      skipped, f'; {note}' if note else '')
    return kernel


def inline_reference() -> bool:
    """Whether operators are written out as the reference's standard operators: while exporting to ONNX."""
    return torch.onnx.is_in_onnx_export()



def autocast_enabled(x: torch.Tensor) -> bool:
    """Whether autocast is on for ``x``'s device (the operators then compute in the maps' dtype)."""
    device = x.device.type
    return x.is_floating_point() and torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device)


def outside_autocast(kernel: Callable) -> Callable:
    """Run an operator's kernel with autocast off: the public functions hand it inputs of one dtype, and the
    convs and norms inside must keep that dtype (autocast would recast them one by one)."""
    @functools.wraps(kernel)
    def run(*args):
        if autocast_enabled(args[0]):
            with torch.autocast(args[0].device.type, enabled=False):
                return kernel(*args)
        return kernel(*args)

    return run
