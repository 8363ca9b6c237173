""" ``timm-san run SCRIPT [ARGS...]``: a script run through the launcher behaves as run by ``python SCRIPT``

The script is ``script_fixtures/report_script.py``, a stand-in for timm's scripts (which CI does not have): it
reports what it saw, so each check compares the launcher with a direct run of the same script rather than with
expected values. Subprocess runs check the process as a whole (both command lines, exit code, stderr);
in-process runs check the rest quickly.
"""
import json
import os
import subprocess
import sys
import traceback
from typing import List, Tuple

import pytest

from timm_san.cli.run import main as run_main

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'script_fixtures')
SCRIPT = os.path.join(FIXTURES, 'report_script.py')
CONSOLE_SCRIPT = os.path.join(os.path.dirname(sys.executable), 'timm-san')


def _run(command: List[str], cwd: str) -> Tuple[int, str]:
    """Run ``command`` in ``cwd``; exit code and stderr."""
    env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
    proc = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    return proc.returncode, proc.stderr


def _read(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def _launchers() -> List[Tuple[str, List[str]]]:
    return [
        ('python -m timm_san run', [sys.executable, '-m', 'timm_san', 'run']),
        ('timm-san run', [CONSOLE_SCRIPT, 'run']),
    ]


def test_console_script_installed():
    assert os.access(CONSOLE_SCRIPT, os.X_OK), (
        f'no timm-san console script beside {sys.executable}: install the package (pip install -e .)')


def test_runs_like_python_with_models_registered(tmp_path):
    # the script given relative to a working directory that is not its own, with arguments and an exit code
    cwd = os.path.dirname(FIXTURES)
    relative = os.path.relpath(SCRIPT, cwd)
    report_path = tmp_path / 'report.json'
    args = ['--model', 'san10_patchwise', '--report', str(report_path), '--exit-code', '3']

    rc_direct, err_direct = _run([sys.executable, relative, *args], cwd)
    assert rc_direct == 3, err_direct
    direct = _read(report_path)
    assert not direct['model_registered'], 'a bare python run must not see the SAN models, or this proves nothing'

    for label, launcher in _launchers():
        report_path.unlink()
        rc, err = _run([*launcher, relative, *args], cwd)
        assert rc == rc_direct, f'{label}: exit code {rc}, direct {rc_direct}\n{err}'
        launched = _read(report_path)
        assert launched['model_registered'], f'{label}: SAN models not registered for the script'
        for key in ('name', 'file', 'prog', 'path0', 'cwd_on_path', 'neighbour'):
            assert launched[key] == direct[key], f'{label}: {key} {launched[key]!r}, direct {direct[key]!r}'
        assert launched['argv'][1:] == direct['argv'][1:], label
        assert os.path.samefile(launched['argv'][0], os.path.join(cwd, direct['argv'][0])), label
        assert launched['path0'] == FIXTURES


def _script_frames(stderr: str) -> List[str]:
    """The traceback from the script's first frame on (a launcher run has the launcher's frames above it)."""
    lines = stderr.splitlines()
    first = next(i for i, line in enumerate(lines) if line.strip().startswith(f'File "{SCRIPT}"'))
    return lines[first:]


def test_traceback_is_the_scripts(tmp_path):
    base = [SCRIPT, '--raise-error', 'bad value 42']
    rc_direct, err_direct = _run([sys.executable, *base], str(tmp_path))
    rc, err = _run([sys.executable, '-m', 'timm_san', 'run', *base], str(tmp_path))
    assert rc == rc_direct == 1
    assert err.startswith('Traceback (most recent call last):'), err
    assert _script_frames(err) == _script_frames(err_direct)
    assert _script_frames(err)[-1] == 'RuntimeError: bad value 42'


@pytest.mark.parametrize('args, code, stderr', [
    ([], 0, ''),
    (['--exit-code', '0'], 0, ''),
    (['--exit-code', '7'], 7, ''),
    (['--exit-message', 'no data at /nowhere'], 1, 'no data at /nowhere\n'),
])
def test_exit_code_in_process(args, code, stderr, capsys):
    assert run_main([SCRIPT, *args]) == code
    assert capsys.readouterr().err == stderr


def test_in_process_restores_argv_and_path(tmp_path):
    argv, path = sys.argv[:], sys.path[:]
    assert run_main([SCRIPT, '--report', str(tmp_path / 'r.json'), '--create']) == 0
    assert (sys.argv, sys.path) == (argv, path)
    report = _read(tmp_path / 'r.json')
    assert report['name'] == '__main__' and report['path0'] == FIXTURES
    assert report['argv'][1:] == ['--report', str(tmp_path / 'r.json'), '--create']
    assert report['logits_shape'] == [1, 3], 'the script could not create and run a SAN model'


def test_in_process_exception_propagates_untouched():
    argv, path = sys.argv[:], sys.path[:]
    with pytest.raises(RuntimeError, match='^bad value 42$') as info:
        run_main([SCRIPT, '--raise-error', 'bad value 42'])
    frames = traceback.extract_tb(info.value.__traceback__)
    assert (frames[-1].filename, frames[-1].name) == (SCRIPT, 'fail')
    assert (sys.argv, sys.path) == (argv, path)


def test_argparse_error_is_the_scripts(capsys):
    assert run_main([SCRIPT, '--no-such-flag']) == 2
    err = capsys.readouterr().err
    assert 'report_script.py: error: unrecognized arguments: --no-such-flag' in err


@pytest.mark.parametrize('argv, message', [
    ([], 'no script given'),
    (['no_such_script.py', '--flag'], "cannot open script: 'no_such_script.py' does not exist"),
    ([FIXTURES], 'is a directory'),
])
def test_bad_script_is_a_clear_error(argv, message, capsys):
    assert run_main(argv) == 2
    err = capsys.readouterr().err
    assert message in err
    assert 'Traceback' not in err


def test_help(capsys):
    assert run_main(['--help']) == 0
    assert 'usage: timm-san run SCRIPT [ARGS...]' in capsys.readouterr().out



def test_symlinked_script_imports_from_its_real_folder(tmp_path):
    # as python does for a symlinked script: sys.path[0] is the folder of the file the link points to
    link = tmp_path / 'linked_script.py'
    link.symlink_to(SCRIPT)
    assert run_main([str(link), '--report', str(tmp_path / 'r.json')]) == 0
    report = _read(tmp_path / 'r.json')
    assert report['path0'] == FIXTURES and report['neighbour'] == 'report_helper'
    assert report['file'] == str(link)
