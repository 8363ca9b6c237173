""" ``python -m timm_san COMMAND ...``, the same as the installed ``timm-san`` (see ``timm_san/cli``) """
import sys

from .cli.main import main

if __name__ == '__main__':
    sys.exit(main())
