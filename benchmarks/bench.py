""" SAN against timm's ResNets on CPU: eval throughput, batch-1 latency, training step time and peak memory

Each thread count runs in a fresh process (what ran before in a process must not decide a kernel's speed), the
models interleaved round by round (a slow spell of a shared machine hits every model alike), and the minimum over
the rounds is reported with the run-to-run spread (max / min). At one thread the times are CPU time (the stable
figure on a shared machine), at more threads wall time. ``uptime`` is printed before and after.

* eval: batch 8 at 224px (img/s) and batch 1 (ms), in ``torch.inference_mode``;
* training: one step at batch 16 (forward, cross-entropy, backward, SGD with momentum), seconds;
* peak memory of a training step above what was held before it: PyTorch's allocations (the profiler's events)
  plus the compiled kernels' own scratch (their pool's peak).

    python benchmarks/bench.py                                   # SAN10 against resnet26, 1 and 2 threads
    python benchmarks/bench.py --models resnet38 san15_patchwise san15_pairwise --rounds 5
    python benchmarks/bench.py --kernels cpu                     # SAN on another backend (TIMM_SAN_KERNELS)
    python benchmarks/bench.py --what eval --after-threads 1     # also: 2 threads after a run at 1, one process
"""
import argparse
import json
import os
import subprocess
import sys
import time
from typing import Callable, Dict, List, Optional

DEFAULT_MODELS = ('resnet26', 'san10_patchwise', 'san10_pairwise')


def _uptime() -> str:
    try:
        return subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()
    except OSError:
        return f'load average {os.getloadavg()}'


# --- the worker: one process, one thread count

def peak_bytes(step: Callable[[], None]) -> int:
    """Peak of the memory a training step allocates above what was held before it: the peak of PyTorch's CPU
    allocations (from the profiler's allocation events, in time order) plus the peak of the compiled kernels'
    scratch (their pool's count), which PyTorch does not see: an upper bound where the two peaks fall apart."""
    import torch
    from timm_san.kernels import cpp
    scratch = cpp.built() is not None and cpp.library()
    empty = torch.empty(0)
    if scratch:
        base = torch.ops.timm_san_cpp.memory_stats(empty, True)[0].item()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if type(node.extra_fields).__name__ == '_ExtraFields_Allocation':
            events.append((node.start_time_ns, node.extra_fields.alloc_size))
        stack.extend(node.children)
    current = peak = 0
    for _, size in sorted(events):
        current += size
        peak = max(peak, current)
    if scratch:
        peak += int(torch.ops.timm_san_cpp.memory_stats(empty, False)[1].item() - base)
    return peak


def _worker(args: argparse.Namespace) -> None:
    import torch
    import torch.nn.functional as F
    import timm
    from timm.models.resnet import Bottleneck, ResNet

    import timm_san  # noqa: F401  (registers the SAN models)

    threads = args.threads[0]
    torch.set_num_threads(threads)
    clock = time.process_time if threads == 1 else time.perf_counter

    def create(name: str) -> torch.nn.Module:
        if name == 'resnet38':  # timm has none: timm's ResNet with the paper's ResNet38 stages
            return ResNet(block=Bottleneck, layers=(2, 3, 5, 2))
        return timm.create_model(name)

    gen = torch.Generator().manual_seed(0)
    inputs = {b: torch.randn(b, 3, 224, 224, generator=gen) for b in (1, args.batch)}
    train_input = torch.randn(args.train_batch, 3, 224, 224, generator=gen)
    target = torch.randint(0, 1000, (args.train_batch,), generator=gen)

    class Runner:
        def __init__(self, name: str):
            self.model = create(name)
            self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9)

        def infer(self, batch: int) -> None:
            self.model.eval()
            with torch.inference_mode():
                self.model(inputs[batch])

        def train(self) -> None:
            self.model.train()
            self.optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(self.model(train_input), target).backward()
            self.optimizer.step()

    def timed(fn: Callable[[], None], repeat: int = 1) -> float:
        start = clock()
        for _ in range(repeat):
            fn()
        return (clock() - start) / repeat

    runners = {name: Runner(name) for name in args.models}
    if args.after_threads:  # a history: every model first runs at another thread count in this process
        torch.set_num_threads(args.after_threads)
        for r in runners.values():
            for _ in range(3):
                r.infer(args.batch), r.infer(1)
        torch.set_num_threads(threads)
    for r in runners.values():  # warm up: allocator, kernels, lazy init
        for _ in range(2):
            r.infer(args.batch), r.infer(1)
        if 'train' in args.what:
            r.train()
    times: Dict[str, Dict[str, List[float]]] = {n: {'eval': [], 'b1': [], 'train': []} for n in runners}
    for round_index in range(args.rounds):
        for name, r in runners.items():
            if 'eval' in args.what:
                times[name]['eval'].append(timed(lambda: r.infer(args.batch)))
                times[name]['b1'].append(timed(lambda: r.infer(1), repeat=4))
            if 'train' in args.what:
                times[name]['train'].append(timed(r.train))
        print(f'  {threads} thread(s): round {round_index + 1}/{args.rounds}', file=sys.stderr, flush=True)
    peaks = {}
    if 'train' in args.what:
        peak_bytes(next(iter(runners.values())).train)  # the profiler's first run allocates for itself
        for name, r in runners.items():
            peaks[name] = peak_bytes(r.train)
    json.dump({'threads': threads, 'after': args.after_threads, 'times': times, 'peaks': peaks}, sys.stdout)


# --- the parent: a worker per thread count, then the tables

def _run_worker(args: argparse.Namespace, threads: int, after: Optional[int] = None) -> dict:
    command = [sys.executable, os.path.abspath(__file__), '--worker', '--threads', str(threads), '--rounds',
               str(args.rounds), '--batch', str(args.batch), '--train-batch', str(args.train_batch), '--models',
               *args.models, '--what', *args.what]
    if after:
        command += ['--after-threads', str(after)]
    env = dict(os.environ)
    if args.kernels:
        env['TIMM_SAN_KERNELS'] = args.kernels
    result = subprocess.run(command, stdout=subprocess.PIPE, env=env, check=True, text=True)
    return json.loads(result.stdout)


def _tables(args: argparse.Namespace, runs: List[dict]) -> str:
    reference = args.reference
    lines = []
    for run in runs:
        t, threads = run['times'], run['threads']
        unit = 'CPU time' if threads == 1 else 'wall time'
        history = f', after a run at {run["after"]} thread(s) in the same process' if run.get('after') else ''
        lines += [f'**{threads} thread(s)**{history} ({unit}, minimum of {args.rounds} rounds; spread = max / min)',
                  '']
        head = '| model |'
        rule = '|---|'
        if 'eval' in args.what:
            head += f' b{args.batch} img/s | vs {reference} | spread | b1 ms |'
            rule += '---:|---:|---:|---:|'
        if 'train' in args.what:
            head += f' train b{args.train_batch} s | vs {reference} | spread | peak MiB | vs {reference} |'
            rule += '---:|---:|---:|---:|---:|'
        lines += [head, rule]
        ref = t.get(reference)
        for name, m in t.items():
            row = f'| {name} |'
            if 'eval' in args.what:
                rate = args.batch / min(m['eval'])
                ratio = f"{min(ref['eval']) / min(m['eval']):.2f}x" if ref else ''
                row += (f' {rate:.1f} | {ratio} | {max(m["eval"]) / min(m["eval"]):.2f} | '
                        f'{min(m["b1"]) * 1e3:.0f} |')
            if 'train' in args.what:
                ratio = f"{min(m['train']) / min(ref['train']):.2f}x" if ref else ''
                peak = run['peaks'][name] / 2 ** 20
                peak_ratio = f"{run['peaks'][name] / run['peaks'][reference]:.2f}x" if ref else ''
                row += (f' {min(m["train"]):.3f} | {ratio} | {max(m["train"]) / min(m["train"]):.2f} | '
                        f'{peak:.0f} | {peak_ratio} |')
            lines.append(row)
        lines.append('')
    fresh = [run for run in runs if not run.get('after')]
    if len(fresh) > 1 and 'eval' in args.what:
        one, more = fresh[0], fresh[-1]
        lines += [f'Speed-up from {one["threads"]} to {more["threads"]} threads (eval b{args.batch}; CPU time at 1 '
                  f'thread, wall time beyond):', '']
        lines += ['| model | speed-up |', '|---|---:|']
        for name in one['times']:
            lines.append(f'| {name} | {min(one["times"][name]["eval"]) / min(more["times"][name]["eval"]):.2f}x |')
        lines.append('')
    return '\n'.join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--models', nargs='+', default=list(DEFAULT_MODELS))
    parser.add_argument('--threads', type=int, nargs='+', default=[1, 2], help='thread counts, each in its own process')
    parser.add_argument('--rounds', type=int, default=7)
    parser.add_argument('--batch', type=int, default=8)
    parser.add_argument('--train-batch', type=int, default=16)
    parser.add_argument('--what', nargs='+', default=['eval', 'train'], choices=['eval', 'train'])
    parser.add_argument('--reference', default='resnet26', help='model the ratios are taken against')
    parser.add_argument('--kernels', default=None, help='TIMM_SAN_KERNELS for the workers (default: as set)')
    parser.add_argument('--after-threads', type=int, default=None,
                        help='also measure each thread count in a process that first ran the models at this many')
    parser.add_argument('--worker', action='store_true', help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        _worker(args)
        return
    import torch
    import timm
    print(f'torch {torch.__version__}, timm {timm.__version__}, {os.cpu_count()} CPUs; '
          f'TIMM_SAN_KERNELS={args.kernels or os.environ.get("TIMM_SAN_KERNELS", "all")}\n')
    print(f'uptime before: {_uptime()}\n')
    runs = [_run_worker(args, threads) for threads in args.threads]
    if args.after_threads and not args.worker:
        runs += [_run_worker(args, threads, args.after_threads) for threads in args.threads
                 if threads != args.after_threads]
    print(_tables(args, runs))
    print(f'uptime after: {_uptime()}')


if __name__ == '__main__':
    main()
