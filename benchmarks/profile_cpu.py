""" Where the CPU time of a model goes: the profiler's operator table for an eval forward or a training step

    python benchmarks/profile_cpu.py --models san10_patchwise san10_pairwise resnet26 --mode eval --batch 8
    python benchmarks/profile_cpu.py --models san10_pairwise --mode train --batch 16 --threads 1 --compile

Each model is warmed up once, then profiled over ``--steps`` calls; the table lists the operators by total self CPU
time, with their share of the wall time of those calls. With ``--compile`` the model runs under ``torch.compile``
(compiled by the warm-up call) and Inductor names its generated kernels, whose sum is printed under the table.
Meant to be read next to ``bench.py``'s ratios, where a target is out of reach.
"""
import argparse
import time

import torch
import torch.nn.functional as F
import timm

import timm_san  # noqa: F401  (registers the SAN models)


def _step(model: torch.nn.Module, x: torch.Tensor, target: torch.Tensor, train: bool) -> None:
    if train:
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), target).backward()
    else:
        with torch.inference_mode():
            model(x)


def profile(name: str, train: bool, batch: int, size: int, steps: int, top: int, compiled: bool) -> None:
    model = timm.create_model(name).train(train)
    if compiled:
        torch._inductor.config.cpp.enable_kernel_profile = True  # Inductor's kernels by name in the profile
        model = torch.compile(model)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, size, size, generator=gen)
    target = torch.randint(0, 1000, (batch,), generator=gen)
    _step(model, x, target, train)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            _step(model, x, target, train)
        wall = (time.perf_counter() - start) / steps
    rows = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    rows.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
    title = f'{name}{" compiled" if compiled else ""}, {"training step" if train else "eval"}'
    print(f'\n### {title}, batch {batch}, {size}px, '
          f'{torch.get_num_threads()} thread(s): {wall:.3f} s per call (profiled)\n')
    print('| operator | calls per step | self CPU s per step | share of wall |')
    print('|---|---:|---:|---:|')
    shown = 0.0
    for event in rows[:top]:
        seconds = event.self_cpu_time_total / 1e6 / steps
        shown += seconds
        print(f'| {event.key} | {event.count // steps} | {seconds:.3f} | {seconds / wall:.0%} |')
    print(f'| (all others) | | {sum(e.self_cpu_time_total for e in rows[top:]) / 1e6 / steps:.3f} | |')
    if compiled:
        generated = sum(e.self_cpu_time_total for e in rows if e.key.startswith('graph_')) / 1e6 / steps
        print(f'\nInductor\'s generated kernels: {generated:.3f} s per call')


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--models', nargs='+', default=['san10_patchwise', 'san10_pairwise', 'resnet26'])
    parser.add_argument('--mode', choices=['eval', 'train'], default='eval')
    parser.add_argument('--batch', type=int, default=8)
    parser.add_argument('--size', type=int, default=224)
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--steps', type=int, default=3)
    parser.add_argument('--top', type=int, default=15)
    parser.add_argument('--compile', action='store_true', help='profile the model under torch.compile')
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f'torch {torch.__version__}')
    for name in args.models:
        profile(name, args.mode == 'train', args.batch, args.size, args.steps, args.top, args.compile)


if __name__ == '__main__':
    main()
