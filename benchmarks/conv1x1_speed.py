""" The compiled 1x1 conv against PyTorch's own ``F.conv2d``, on the shapes of SAN's stage and block convs

Each shape is timed interleaved (PyTorch's conv, then the compiled tiles), minimum of ``--rounds`` calls, in
``torch.inference_mode``, wall time, at the thread count given. Shapes with fewer pixels than the kernel's
``SMALL_MAP_PIXELS`` are handed to PyTorch's conv by the kernel itself; they are timed here on the tiles
(``torch.ops.timm_san_cpp.conv1x1``) to show why.

    python benchmarks/conv1x1_speed.py --threads 1
    python benchmarks/conv1x1_speed.py --threads 2
"""
import argparse
import time

import torch
import torch.nn.functional as F

from timm_san.kernels import cpp

# (batch, in channels, out channels, map side)
SHAPES = [
    (8, 64, 256, 56), (8, 256, 64, 56), (8, 128, 512, 28), (8, 512, 128, 28), (8, 256, 1024, 14),
    (8, 1024, 256, 14), (8, 512, 2048, 7), (8, 2048, 512, 7),
    (1, 64, 256, 56), (1, 512, 128, 28), (1, 1024, 256, 14), (1, 2048, 512, 7),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument('--threads', type=int, default=1)
    parser.add_argument('--rounds', type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not cpp.library():
        raise SystemExit(f'the compiled kernels are unavailable: {cpp.unavailable_reason()}')
    print(f'{args.threads} thread(s), wall time, minimum of {args.rounds} calls\n')
    print('| batch | in -> out | map | PyTorch ms | GMAC/s | tiles ms | GMAC/s | tiles / PyTorch |')
    print('|---:|---|---:|---:|---:|---:|---:|---:|')
    gen = torch.Generator().manual_seed(0)
    for batch, c_in, c_out, side in SHAPES:
        x = torch.randn(batch, c_in, side, side, generator=gen)
        weight, bias = torch.randn(c_out, c_in, 1, 1, generator=gen), torch.randn(c_out, generator=gen)
        matrix = weight.reshape(c_out, c_in)
        runs = {'torch': lambda: F.conv2d(x, weight, bias),
                'tiles': lambda: torch.ops.timm_san_cpp.conv1x1(x, matrix, bias)}
        times = {name: [] for name in runs}
        with torch.inference_mode():
            for run in runs.values():
                run()
            for _ in range(args.rounds):
                for name, run in runs.items():
                    start = time.perf_counter()
                    run()
                    times[name].append(time.perf_counter() - start)
        best = {name: min(t) for name, t in times.items()}
        macs = batch * c_in * c_out * side * side
        print(f'| {batch} | {c_in} -> {c_out} | {side}x{side} | {best["torch"] * 1e3:.2f} | '
              f'{macs / best["torch"] / 1e9:.0f} | {best["tiles"] * 1e3:.2f} | {macs / best["tiles"] / 1e9:.0f} | '
              f'{best["tiles"] / best["torch"]:.2f} |')


if __name__ == '__main__':
    main()
