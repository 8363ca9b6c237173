""" Triton backend of SAN's operators (CUDA; CPU tensors under Triton's interpreter): one kernel per SAM in eval
(``attention``), one per gather/aggregate operator and direction (``launch``), which the attention's reference
uses in training

Optional: without Triton this package imports, ``AVAILABLE`` is False and the dispatch never picks it.
"""
try:
    from .attention import pairwise_eval, patchwise_eval
    from .launch import aggregation, aggregation_backward, footprint, footprint_backward, offset_sum, subtraction2
    AVAILABLE = True
except ImportError:  # CPU-only installs: the reference serves every call
    AVAILABLE = False

__all__ = ['AVAILABLE', 'footprint', 'subtraction2', 'aggregation', 'footprint_backward', 'offset_sum',
           'aggregation_backward', 'pairwise_eval', 'patchwise_eval']
