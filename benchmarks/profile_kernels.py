""" Where the compiled attention kernels spend their time, phase by phase, for each SAM configuration of SAN10

Builds the kernels with per-phase cycle counters (``TIMM_SAN_CPP_DEFINES=SAN_PROFILE``, a cache entry of its own),
then runs each stage's SAM (random maps and parameters, SAN10's shapes at 224px) on one thread: eval, or a training
forward and backward (``--train``). Prints the CPU time of one call (minimum of ``--repeats``), the share of each
phase in the counted cycles, and (eval) the products' throughput: the mapping's multiply-adds over the product
phase's share of the call.

    python benchmarks/profile_kernels.py
    python benchmarks/profile_kernels.py --train --batch 16
"""
import argparse
import os
import time

os.environ['TIMM_SAN_CPP_DEFINES'] = 'SAN_PROFILE'  # before the kernels are built or loaded

import torch  # noqa: E402

from timm_san.kernels import cpp  # noqa: E402

PHASES = ['pad', 'pack', 'product', 'softmax', 'layout', 'aggregate', 'aggregate_grad', 'scatter', 'reduce']
# SAN10's stages at 224px: width, map side, footprint
STAGES = [(64, 112, 3), (256, 56, 7), (512, 28, 7), (1024, 14, 7), (2048, 7, 7)]


def call(kind: str, train: bool, batch: int, width: int, side: int, k: int):
    planes, mid = width // 16, width // 4
    weight_planes, offsets = mid // 8, k * k
    gen = torch.Generator().manual_seed(0)
    x1, x2 = (torch.randn(batch, planes, side, side, generator=gen) for _ in range(2))
    x3 = torch.randn(batch, mid, side, side, generator=gen)
    position = torch.randn(1, 2, side, side, generator=gen)
    empty = torch.empty(0)
    if kind == 'pairwise':
        ins, outs = [planes + 2, planes], [planes, weight_planes]
    else:
        ins, outs = [planes * (offsets + 1), weight_planes], [weight_planes, offsets * weight_planes]
    weights = [torch.randn(o, i, 1, 1, generator=gen) / i ** 0.5 for i, o in zip(ins, outs)]
    biases = [empty, torch.randn(outs[1], generator=gen)]
    eps = [1e-5, 1e-5]
    ops = torch.ops.timm_san_cpp
    if not train:
        norms = [t for n in ins for t in (torch.rand(n) + 0.5, torch.randn(n), torch.randn(n), torch.rand(n) + 0.5)]
        if kind == 'pairwise':
            return lambda: ops.pairwise_eval(x1, x2, x3, position, norms, eps, weights, biases, k, 0)
        return lambda: ops.patchwise_eval(x1, x2, x3, norms, eps, weights, biases, k, 0)
    norms = [t for n in ins for t in (torch.rand(n) + 0.5, torch.randn(n))]

    def step():
        if kind == 'pairwise':
            out, saved = ops.pairwise_train(x1, x2, x3, position, norms, eps, weights, biases, k, 0)
            ops.pairwise_backward(out, x1, x2, x3, position, norms, eps, saved, weights, biases, k, 0)
        else:
            out, saved, hidden = ops.patchwise_train(x1, x2, x3, norms, eps, weights, biases, k, 0)
            ops.patchwise_backward(out, x1, x2, x3, norms, eps, saved, hidden, weights, biases, k, 0)
    return step


def mapping_macs(kind: str, batch: int, width: int, side: int, k: int) -> int:
    """Multiply-adds of the weight mapping's two layers in one eval call (what the product phase computes)."""
    planes, weight_planes, offsets = width // 16, width // 32, k * k
    if kind == 'pairwise':  # both layers at every pixel and offset
        per_pixel = offsets * ((planes + 2) * planes + planes * weight_planes)
    else:  # the footprint's relation to the hidden layer, then the hidden layer to every offset's weights
        per_pixel = planes * (offsets + 1) * weight_planes + weight_planes * offsets * weight_planes
    return batch * side * side * per_pixel


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--train', action='store_true', help='a training forward and backward (default: eval)')
    parser.add_argument('--batch', type=int, default=8)
    parser.add_argument('--repeats', type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if not cpp.library():
        raise SystemExit(f'the compiled kernels are unavailable: {cpp.unavailable_reason()}')
    empty = torch.empty(0)
    print(f'{"training forward and backward" if args.train else "eval"}, batch {args.batch}, 1 thread, CPU time\n')
    print('| SAM | width | map | ms per call | ' + ' | '.join(PHASES) + ' |' + ('' if args.train else ' GMAC/s |'))
    print('|---|---:|---:|---:|' + '---:|' * (len(PHASES) + (0 if args.train else 1)))
    for width, side, k in STAGES:
        for kind in ('pairwise', 'patchwise'):
            fn = call(kind, args.train, args.batch, width, side, k)
            fn()
            best, counters = float('inf'), None
            for _ in range(args.repeats):
                torch.ops.timm_san_cpp.profile_counters(empty, True)
                start = time.process_time()
                fn()
                elapsed = time.process_time() - start
                if elapsed < best:
                    best, counters = elapsed, torch.ops.timm_san_cpp.profile_counters(empty, True)
            shares = counters / counters.sum()
            rate = ''
            if not args.train:  # the mapping's multiply-adds over the product phase's share of the call
                product_seconds = best * shares[PHASES.index('product')].item()
                rate = f' {mapping_macs(kind, args.batch, width, side, k) / product_seconds / 1e9:.0f} |'
            print(f'| {kind} | {width} | {side} | {best * 1e3:.1f} | '
                  + ' | '.join(f'{s:.0%}' if s > 0 else '' for s in shares.tolist()) + ' |' + rate)


if __name__ == '__main__':
    main()
