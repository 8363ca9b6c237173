""" Command line of timm-san: ``python -m timm_san {demo,run} ...`` (also installed as ``timm-san``)

    demo    create every SAN model through timm and run it on an image
    run     run a script (timm's train.py, validate.py, ...) with the SAN models registered
"""
import sys
from typing import List, Optional

COMMANDS = {
    'demo': 'create every SAN model through timm and run it on an image',
    'run': 'run SCRIPT [ARGS...] as __main__ with the SAN models registered (timm\'s validate.py, ...)',
}


def _usage() -> str:
    lines = ['usage: timm-san {' + ','.join(COMMANDS) + '} ...', '']
    lines += [f'  {name:6s}  {text}' for name, text in COMMANDS.items()]
    return '\n'.join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ('-h', '--help'):
        print(_usage())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == 'demo':
        from .demo import main as demo_main
        return demo_main(rest)
    if command == 'run':
        from .launcher import main as run_main
        return run_main(rest)
    print(f'timm-san: unknown command {command!r}\n\n{_usage()}', file=sys.stderr)
    return 2


if __name__ == '__main__':
    sys.exit(main())
