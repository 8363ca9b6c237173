""" Kernels of SAN's operators, one subpackage per backend

    ``reference``  plain PyTorch, every device and dtype: the spec, and what ONNX export writes out
    ``cpu``        fused loops for CPU inference and training (cache-sized chunks, no ``k * k``-fold buffers)
    ``triton``     Triton kernels for CUDA (optional; CPU tensors under Triton's interpreter)
    ``common``     helpers the backends share

The operators of ``timm_san.ops`` call these; which one runs is decided by ``timm_san.ops.dispatch``.
"""
