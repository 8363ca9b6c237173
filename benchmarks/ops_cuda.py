""" Micro-benchmark of SAN's operators on CUDA: the Triton kernels against the PyTorch operators

Times forward and forward + backward of every operator at the shapes SAN10 gives it at a 224 px input (stage
width ``planes``: relation maps ``planes / 16``, aggregated maps ``planes / 4``, weight channels a further ``/ 8``),
once through the Triton kernels and once under ``timm_san.ops.use_kernels('reference')`` (the reference), and
prints a markdown table of median milliseconds (``triton.testing.do_bench``) and speedups.

    python benchmarks/ops_cuda.py                      # batch 32, stages 0-4, fp32 and bf16
    python benchmarks/ops_cuda.py --dtypes amp --stages 1 2

Dtypes: ``fp32``; ``bf16`` (every tensor bf16); ``amp`` (bf16 maps, float32 aggregation weights: what bf16
autocast hands the pairwise aggregation, whose weights come out of a softmax).
"""
import argparse
import sys
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from timm_san import ops
from timm_san.kernels import triton as triton_kernels

# SAN10 at 224 px: (stage width, footprint side, map side)
STAGES = [(64, 3, 112), (256, 7, 56), (512, 7, 28), (1024, 7, 14), (2048, 7, 7)]
OPERATORS = ['subtraction2', 'footprint', 'subtraction', 'aggregation']


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0].strip())
    parser.add_argument('--batch', type=int, default=32, help='batch size (default 32)')
    parser.add_argument('--stages', type=int, nargs='+', default=list(range(len(STAGES))), choices=range(len(STAGES)),
                        help='SAN10 stages to time (default all): ' + ', '.join(
                            f'{i}: width {p}, k={k}, {s}x{s}' for i, (p, k, s) in enumerate(STAGES)))
    parser.add_argument('--dtypes', nargs='+', default=['fp32', 'bf16'], choices=['fp32', 'bf16', 'amp'],
                        help='dtypes (default fp32 bf16)')
    parser.add_argument('--ops', nargs='+', default=OPERATORS, choices=OPERATORS, help='operators (default all)')
    parser.add_argument('--warmup', type=int, default=25, help='do_bench warmup, ms (default 25)')
    parser.add_argument('--rep', type=int, default=100, help='do_bench repetitions, ms (default 100)')
    return parser.parse_args(argv)


def _inputs(op: str, stage: int, batch: int, dtype: str) -> Tuple[List[torch.Tensor], int, str]:
    """Leaf tensors of one operator call, its footprint side and a shape description."""
    planes, kernel_size, size = STAGES[stage]
    rel, mid = planes // 16, planes // 4
    weight_channels = mid // 8
    map_dtype = torch.float32 if dtype == 'fp32' else torch.bfloat16
    weight_dtype = torch.bfloat16 if dtype == 'bf16' else torch.float32

    def rand(*shape, dt=map_dtype):
        return torch.randn(*shape, device='cuda', dtype=dt).requires_grad_()

    if op == 'subtraction2':
        return [rand(batch, rel, size, size), rand(batch, rel, size, size)], kernel_size, f'{batch}x{rel}x{size}x{size}'
    if op == 'footprint':
        return [rand(batch, rel, size, size)], kernel_size, f'{batch}x{rel}x{size}x{size}'
    if op == 'subtraction':  # the position encoding's relation: one sample, two channels
        return [rand(1, 2, size, size)], kernel_size, f'1x2x{size}x{size}'
    x = rand(batch, mid, size, size)
    weight = torch.softmax(torch.randn(
        batch, weight_channels, kernel_size * kernel_size, size * size, device='cuda'), dim=2).to(weight_dtype)
    return [x, weight.requires_grad_()], kernel_size, f'{batch}x{mid}x{size}x{size}, Cw {weight_channels}'


def _call(op: str, inputs: List[torch.Tensor], kernel_size: int) -> torch.Tensor:
    return getattr(ops, op)(*inputs, kernel_size)


def _time(fn: Callable[[], object], inputs: List[torch.Tensor], args: argparse.Namespace) -> float:
    import triton.testing
    return triton.testing.do_bench(fn, warmup=args.warmup, rep=args.rep, grad_to_none=inputs, return_mode='median')


def _measure(op: str, inputs: List[torch.Tensor], kernel_size: int, args: argparse.Namespace) -> Dict[str, float]:
    out = _call(op, inputs, kernel_size)
    grad = torch.randn_like(out)

    def forward():
        with torch.no_grad():
            _call(op, inputs, kernel_size)

    def forward_backward():
        _call(op, inputs, kernel_size).backward(grad)

    return {'fwd': _time(forward, inputs, args), 'fwd+bwd': _time(forward_backward, inputs, args)}


def _difference(op: str, inputs: List[torch.Tensor], kernel_size: int) -> float:
    """Largest difference of the Triton and PyTorch outputs and input gradients, relative to the largest value."""
    results = []
    for kernels in ('all', 'reference'):
        with ops.use_kernels(kernels):
            leaves = [t.detach().clone().requires_grad_() for t in inputs]
            out = _call(op, leaves, kernel_size)
            out.backward(torch.ones_like(out))
        results.append([out.detach().float()] + [t.grad.float() for t in leaves])
    return max(((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item() for a, b in zip(*results))


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit('ops_cuda.py times CUDA kernels: no CUDA device is available here.')
    if not triton_kernels.AVAILABLE:
        raise SystemExit('ops_cuda.py compares the Triton kernels with the PyTorch operators: Triton is not installed.')
    import triton
    print(f'{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, '
          f'batch {args.batch}; median ms of triton.testing.do_bench; speedup = PyTorch / Triton\n')
    print('| stage | operator | input | dtype | fwd PyTorch | fwd Triton | speedup | fwd+bwd PyTorch | fwd+bwd Triton '
          '| speedup | max rel diff |')
    print('|---|---|---|---|---|---|---|---|---|---|---|')
    for stage in args.stages:
        for op in args.ops:
            for dtype in args.dtypes:
                inputs, kernel_size, shape = _inputs(op, stage, args.batch, dtype)
                if ops.select_kernel(op, inputs[0]) != 'triton':
                    print(f'warning: {op} does not reach the Triton kernels', file=sys.stderr)
                fast = _measure(op, inputs, kernel_size, args)
                with ops.use_kernels('reference'):
                    plain = _measure(op, inputs, kernel_size, args)
                diff = _difference(op, inputs, kernel_size)
                cells = [str(stage), op, f'{shape}, k {kernel_size}', dtype]
                for mode in ('fwd', 'fwd+bwd'):
                    cells += [f'{plain[mode]:.3f}', f'{fast[mode]:.3f}', f'{plain[mode] / fast[mode]:.2f}x']
                print('| ' + ' | '.join(cells + [f'{diff:.1e}']) + ' |', flush=True)
                del inputs
                torch.cuda.empty_cache()


if __name__ == '__main__':
    main()
