""" ``timm-san kernels [--build]``: which kernels SAN's operators run here, and the compiled CPU kernels' build

Prints the backends the switch allows (``TIMM_SAN_KERNELS``), whether the compiled C++ CPU kernels are built for
this machine (and where), and why not if they cannot be. ``--build`` builds them now (what the first forward of a
process would otherwise do), e.g. in a container image, so that no process of it waits for the compiler.
"""
import argparse
import sys
import time
from typing import List, Optional

__all__ = ['main']


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog='timm-san kernels', description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--build', action='store_true', help='build the compiled CPU kernels now if need be')
    args = parser.parse_args(argv)

    import torch

    from ..kernels import cpp
    from ..ops import enabled_kernels

    enabled = sorted(enabled_kernels())
    print(f'backends allowed: {", ".join(enabled) if enabled else "none (reference kernels only)"}')
    print(f'torch {torch.__version__}; compiled CPU kernels cached in {cpp.cache_dir()}')
    built = cpp.built()
    if built is not None:
        print(f'compiled CPU kernels: built ({built})')
    elif not args.build:
        print('compiled CPU kernels: not built yet for this machine (the first forward builds them, or '
              'timm-san kernels --build)')
        return 0
    start = time.perf_counter()
    if not cpp.library():
        print(f'compiled CPU kernels: unavailable: {cpp.unavailable_reason()}', file=sys.stderr)
        return 1
    if built is None:
        print(f'compiled CPU kernels: built in {time.perf_counter() - start:.0f} s ({cpp.built()})')
    return 0
