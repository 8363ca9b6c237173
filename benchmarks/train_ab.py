""" Interleaved A/B of the CPU training step of a SAN model on several kernel backends, in one process, with a
timm reference model for the ratios

    python benchmarks/train_ab.py --models san10_pairwise --threads 1 --rounds 5     # cpp against cpu
    python benchmarks/train_ab.py --kernels cpp reference

Each backend is chosen through ``timm_san.ops.use_kernels``. Time per step is wall-clock and process CPU time (at
one thread the latter is less sensitive to other processes on a shared machine; at two it also counts the threads'
spinning), minimum of the rounds. Peak memory is ``bench.peak_bytes``: PyTorch's allocations (the profiler's
events in time order) plus the compiled kernels' scratch.
"""
import argparse
import os
import sys
import time
from typing import Dict, List

import torch
import torch.nn.functional as F
import timm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timm_san import ops  # noqa: E402
from bench import peak_bytes  # noqa: E402


class Step:
    def __init__(self, name: str, kernels: str, batch: int, size: int):
        self.name, self.kernels = name, kernels
        torch.manual_seed(0)
        self.model = timm.create_model(name).train()
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9)
        gen = torch.Generator().manual_seed(0)
        self.x = torch.randn(batch, 3, size, size, generator=gen)
        self.target = torch.randint(0, 1000, (batch,), generator=gen)

    def __call__(self) -> None:
        with ops.use_kernels(self.kernels):
            self.optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(self.model(self.x), self.target).backward()
            self.optimizer.step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--models', nargs='+', default=['san10_pairwise'])
    parser.add_argument('--reference', default='resnet26')
    parser.add_argument('--threads', type=int, default=1)
    parser.add_argument('--rounds', type=int, default=3)
    parser.add_argument('--batch', type=int, default=16)
    parser.add_argument('--size', type=int, default=224)
    parser.add_argument('--kernels', nargs='+', default=['cpp', 'cpu'], help='backends to compare')
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    steps = [Step(args.reference, 'all', args.batch, args.size)]
    for name in args.models:
        steps += [Step(name, kernels, args.batch, args.size) for kernels in args.kernels]
    labels = [s.name if s.name == args.reference else f'{s.name} {s.kernels}' for s in steps]
    for step in steps:
        step()
    times: Dict[str, List[float]] = {label: [] for label in labels}
    cpu_times: Dict[str, List[float]] = {label: [] for label in labels}
    for _ in range(args.rounds):
        for label, step in zip(labels, steps):
            start, cpu_start = time.perf_counter(), time.process_time()
            step()
            times[label].append(time.perf_counter() - start)
            cpu_times[label].append(time.process_time() - cpu_start)
    print(f'torch {torch.__version__}, {torch.get_num_threads()} thread(s), batch {args.batch}, {args.size}px, '
          f'minimum of {args.rounds} interleaved rounds, load average {os.getloadavg()[0]:.1f}')
    peak_bytes(steps[0])  # the profiler's first run allocates for itself
    peaks = [peak_bytes(step) for step in steps]
    ref_time, ref_cpu = min(times[labels[0]]), min(cpu_times[labels[0]])
    ref_peak = peaks[0]
    print('| step | s/step | vs ref | CPU s/step | vs ref | peak MiB | vs ref |')
    print('|---|---:|---:|---:|---:|---:|---:|')
    for label, peak in zip(labels, peaks):
        t, cpu = min(times[label]), min(cpu_times[label])
        print(f'| {label} | {t:.2f} | {t / ref_time:.2f}x | {cpu:.2f} | {cpu / ref_cpu:.2f}x '
              f'| {peak / 2 ** 20:.0f} | {peak / ref_peak:.2f}x |')


if __name__ == '__main__':
    main()
