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
