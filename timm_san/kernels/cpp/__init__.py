""" Compiled C++ kernels of SAN's attention on CPU (PyTorch's stable ABI), built once per machine and cached

``library()`` builds or loads them (see ``build``); ``attention`` calls them. Without a compiler or with torch older
than 2.10 they are unavailable, and the dispatch picks the ``cpu`` backend's kernels instead.
"""
from .build import built, cache_dir, library, unavailable_reason

__all__ = ['library', 'unavailable_reason', 'built', 'cache_dir']
