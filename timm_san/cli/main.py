""" ``timm-san COMMAND ...``: one entry point, each command in its own module, loaded only when it runs """
import importlib
import sys
from typing import List, Optional

from ..version import __version__

__all__ = ['COMMANDS', 'main']

# name: (module, summary)
COMMANDS = {
    'demo': ('demo', 'create every SAN model through timm and run it on an image'),
    'download': ('download', 'download the official weights, check and convert them for timm (local-dir:)'),
    'run': ('run', "run SCRIPT [ARGS...] as __main__ with the SAN models registered (timm's validate.py, ...)"),
    'convert': ('convert', 'convert an official checkpoint file into a folder timm loads and the Hub takes'),
    'upload': ('upload', 'upload converted folders to Hugging Face Hub repositories'),
    'publish': ('publish', 'download, verify, convert and upload the official weights (needs a Hub token)'),
    'kernels': ('kernels', 'which kernels run here; build the compiled CPU kernels now (--build)'),
}


def _usage() -> str:
    lines = ['usage: timm-san [--version] {' + ','.join(COMMANDS) + '} ...', '']
    lines += [f'  {name:9s} {summary}' for name, (_, summary) in COMMANDS.items()]
    lines += ['', 'timm-san COMMAND --help tells more.']
    return '\n'.join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    """Run one command.

    Args:
        argv: The command and its arguments (default: ``sys.argv[1:]``).

    Returns:
        The exit code: the command's, or 2 for a missing or unknown command.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ('-h', '--help'):
        print(_usage())
        return 0 if argv else 2
    if argv[0] == '--version':
        print(f'timm-san {__version__}')
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f'timm-san: unknown command {command!r}\n\n{_usage()}', file=sys.stderr)
        return 2
    module = importlib.import_module(f'.{COMMANDS[command][0]}', __package__)
    return module.main(rest)
