""" Run a Python script as ``__main__`` with the SAN models registered: ``timm-san run SCRIPT [ARGS...]``

timm's ``train.py`` imports extra modules itself (``--device-modules timm_san``), but ``validate.py``,
``inference.py`` and ``benchmark.py`` have no such hook: they only know the models registered when they call
``timm.create_model``. The launcher imports ``timm_san`` (which registers ``san10_pairwise``, ...) and then runs
the script the way ``python SCRIPT ARGS...`` would:

* ``sys.argv`` is ``[SCRIPT, *ARGS]``, so the script's argparse sees its own arguments and program name
  (``runpy`` makes ``sys.argv[0]`` the script's absolute path while it runs; the basename argparse shows is the
  same);
* ``sys.path[0]`` is the script's directory (symlinks resolved), so the script imports its neighbours, and the
  launcher's own directory is not on the path;
* ``__name__`` is ``'__main__'`` and ``__file__`` the script's absolute path;
* ``SystemExit`` becomes the exit code (``None`` is 0, an integer is itself, anything else is printed to stderr
  and is 1); any other exception propagates untouched, so Python prints the script's own traceback and exits 1.
"""
import os
import runpy
import sys
from typing import List

__all__ = ['ScriptNotFoundError', 'main', 'run_script']

_USAGE = 'usage: timm-san run SCRIPT [ARGS...]'
_HELP = f"""{_USAGE}

Run SCRIPT as __main__ with ARGS, the SAN models registered in timm first. For timm's scripts, e.g.:
  timm-san run validate.py --model san10_patchwise --pretrained --data-dir /data/imagenet --device cpu
  timm-san run benchmark.py --model san10_patchwise --device cpu
(train.py can also import timm_san itself: python train.py ... --device-modules timm_san)"""

# what Python itself exits with when it cannot open the script it is given
_CANNOT_OPEN_EXIT = 2


class ScriptNotFoundError(FileNotFoundError):
    """The script to run is not a file."""


def _exit_code(code: object) -> int:
    """The process exit code Python derives from ``SystemExit.code``, printing a non-integer code as it does."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


def run_script(script: str, args: List[str]) -> int:
    """Run ``script`` as ``__main__`` with ``args`` as its command line.

    ``sys.argv`` and ``sys.path`` are restored afterwards, so the launcher can also be called in-process.

    Args:
        script: Path of the Python file to run.
        args: Its arguments (without the script itself).

    Returns:
        The script's exit code: 0 when it returns, else from the ``SystemExit`` it raised.

    Raises:
        ScriptNotFoundError: No file at ``script`` (or it is a directory).
        BaseException: Whatever the script raises other than ``SystemExit``, with its traceback.
    """
    if not os.path.isfile(script):
        what = 'is a directory' if os.path.isdir(script) else 'does not exist'
        raise ScriptNotFoundError(
            f'{script!r} {what}: give the path of a Python script file (train.py, validate.py, ...)')
    # registers the SAN models in timm's registry before the script creates any model
    import timm_san  # noqa: F401

    script_path = os.path.realpath(script)
    saved_argv, saved_path = sys.argv[:], sys.path[:]
    sys.argv = [script, *args]
    if sys.path:
        sys.path[0] = os.path.dirname(script_path)
    else:
        sys.path.insert(0, os.path.dirname(script_path))
    try:
        # __file__ absolute, as Python (3.9+) sets it for ``python SCRIPT``
        runpy.run_path(os.path.abspath(script), run_name='__main__')
    except SystemExit as e:
        return _exit_code(e.code)
    finally:
        sys.argv = saved_argv
        sys.path[:] = saved_path
    return 0


def main(argv: List[str]) -> int:
    """``timm-san run SCRIPT [ARGS...]``.

    Args:
        argv: The script and its arguments.

    Returns:
        The script's exit code; 2 (and a message on stderr) when no script is given or it cannot be opened.
    """
    if not argv:
        print(f'timm-san run: no script given\n\n{_HELP}', file=sys.stderr)
        return 2
    if argv[0] in ('-h', '--help'):
        print(_HELP)
        return 0
    script, args = argv[0], argv[1:]
    try:
        return run_script(script, args)
    except ScriptNotFoundError as e:
        print(f'timm-san run: cannot open script: {e}', file=sys.stderr)
        return _CANNOT_OPEN_EXIT
