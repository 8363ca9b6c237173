import logging
import os
import sys

import pytest

# tests import their helpers (reference.py, ...) as top-level modules
sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture
def kernels_run(caplog):
    """The kernels SAN's operators ran since the last look, as the dispatch's debug log names them:
    ``kernels_run(op)`` gives ``[[operator, kernel], ...]`` for the operators whose name holds ``op`` (default: the
    attention operators; ``''``: every operator)."""
    caplog.set_level(logging.DEBUG, logger='timm_san.ops')

    def names(op: str = 'attention'):
        messages = [r.getMessage() for r in caplog.records if r.name == 'timm_san.ops']
        caplog.clear()
        return [m.split(' kernel')[0].split(': ') for m in messages if op in m.split(':')[0]]

    yield names
    caplog.clear()


@pytest.fixture(params=['cpp', 'cpu'])
def backend(request):
    """Each CPU backend in turn, chosen through the switch: ``cpp`` (the compiled kernels, built on first use) and
    ``cpu`` (the fallback without a compiler). ``cpp`` is skipped, with the reason, only where this machine cannot
    build it (no compiler, torch too old); a build that fails on our sources fails the test."""
    from timm_san import ops
    from timm_san.kernels import cpp
    if request.param == 'cpp' and not cpp.library():
        reason = cpp.unavailable_reason()
        if 'compiler failed' in reason:
            pytest.fail(f'the C++ kernels do not build: {reason}')
        pytest.skip(f'the C++ kernels cannot be built here: {reason}')
    with ops.use_kernels(request.param):
        yield request.param
