""" Speed and memory of the SAN models against timm's ResNets and against the plain unfold implementation

One process, models interleaved round by round (so a slow spell of a shared machine hits every model alike),
medians over the rounds:

* inference throughput, eval mode, 224px, batch 8 and batch 1 (img/s);
* one training step at batch 16 (forward, cross-entropy, backward, SGD step): median time and peak memory.

Peak memory is what the step allocates above what was held before it (activations, gradients, workspace):
on CUDA ``torch.cuda.max_memory_allocated``, on CPU the running sum of the allocator's events recorded by
``torch.profiler`` in a separate, untimed step.

    python benchmarks/bench.py                       # CPU, 2 threads
    python benchmarks/bench.py --device cuda         # CUDA, fp32 and bf16 autocast
    python benchmarks/bench.py --models san15_pairwise resnet50 --rounds 5
"""
import argparse
import contextlib
import os
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
import timm
from timm.models.resnet import Bottleneck, ResNet

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import timm_san  # noqa: F401,E402  (registers the SAN models)
from unfold_baseline import unfold_model  # noqa: E402

DEFAULT_MODELS = (
    'resnet26', 'resnet38', 'resnet50', 'san10_patchwise', 'san10_pairwise',
    'unfold:san10_patchwise', 'unfold:san10_pairwise',
)


def create(name: str) -> nn.Module:
    """A timm model, ``resnet38``, or ``unfold:<san model>`` for the unfold baseline with that model's weights.

    timm has no ResNet38; this one is timm's ResNet with the paper's ResNet38 stages (2, 3, 5, 2 bottlenecks).
    """
    if name == 'resnet38':
        return ResNet(block=Bottleneck, layers=(2, 3, 5, 2))
    if name.startswith('unfold:'):
        san_name = name.split(':', 1)[1]
        model = unfold_model(san_name)
        model.load_state_dict(timm.create_model(san_name).state_dict())
        return model
    return timm.create_model(name)


def sync(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], None], device: torch.device, repeat: int = 1) -> float:
    """Seconds per call of ``fn``."""
    sync(device)
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    sync(device)
    return (time.perf_counter() - start) / repeat


def cpu_peak_bytes(fn: Callable[[], None]) -> int:
    """Peak of the bytes allocated on CPU while ``fn`` runs, above what was held before.

    Read from the profiler's allocation and free events in time order. (Summing each op's self memory instead books
    the frees a Python ``autograd.Function`` makes between its ops at the Function's start, and under-counts.)
    """
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
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
    return peak


def cuda_peak_bytes(fn: Callable[[], None], device: torch.device) -> int:
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    sync(device)
    return torch.cuda.max_memory_allocated(device) - base


class Runner:
    """One model's inference and training closures, on one device and precision."""

    def __init__(self, name: str, device: torch.device, autocast: Optional[torch.dtype], train_batch: int,
                 size: int = 224):
        self.name = name
        self.device = device
        self.autocast = autocast
        self.model = create(name).to(device)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9)
        gen = torch.Generator().manual_seed(0)
        self.inputs = {b: torch.randn(b, 3, size, size, generator=gen).to(device) for b in (1, 8)}
        self.train_input = torch.randn(train_batch, 3, size, size, generator=gen).to(device)
        self.target = torch.randint(0, 1000, (train_batch,), generator=gen).to(device)

    def _ctx(self):
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast)

    def infer(self, batch: int) -> None:
        self.model.eval()
        with torch.inference_mode(), self._ctx():
            self.model(self.inputs[batch])

    def train_step(self) -> None:
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        with self._ctx():
            loss = F.cross_entropy(self.model(self.train_input), self.target)
        loss.backward()
        self.optimizer.step()


def run(args: argparse.Namespace, device: torch.device, autocast: Optional[torch.dtype]) -> List[Dict[str, float]]:
    runners = [Runner(name, device, autocast, args.train_batch) for name in args.models]
    for r in runners:  # warm up: allocator, kernels, lazy init
        r.infer(8), r.infer(1), r.train_step()
    times: Dict[str, Dict[str, List[float]]] = {r.name: {'b8': [], 'b1': [], 'train': []} for r in runners}
    for round_index in range(args.rounds):
        for r in runners:
            t = times[r.name]
            t['b8'].append(timed(lambda: r.infer(8), device, repeat=args.repeat))
            t['b1'].append(timed(lambda: r.infer(1), device, repeat=args.b1_repeat * args.repeat))
            t['train'].append(timed(r.train_step, device, repeat=args.repeat))
        print(f'  round {round_index + 1}/{args.rounds} done', file=sys.stderr, flush=True)
    rows = []
    if device.type == 'cpu':
        cpu_peak_bytes(runners[0].train_step)  # the profiler's first run allocates for itself
    for r in runners:
        if device.type == 'cuda':
            peak = cuda_peak_bytes(r.train_step, device)
        else:
            peak = cpu_peak_bytes(r.train_step)
        t = times[r.name]
        rows.append(dict(
            name=r.name,
            b8=8 / statistics.median(t['b8']),
            b1=1 / statistics.median(t['b1']),
            train=statistics.median(t['train']),
            peak=peak / 2 ** 20,
        ))
        del r.model, r.optimizer
    return rows


def table(rows: List[Dict[str, float]], reference: str, train_batch: int) -> str:
    ref = next((row for row in rows if row['name'] == reference), None)
    lines = [
        f'| model | b8 img/s | b1 img/s | train b{train_batch} s/step | train peak MiB '
        f'| b8 thr. vs {reference} | step time vs {reference} | memory vs {reference} |',
        '|---|---:|---:|---:|---:|---:|---:|---:|',
    ]
    for row in rows:
        ratios = ['', '', '']
        if ref is not None:
            ratios = [f"{row['b8'] / ref['b8']:.2f}x", f"{row['train'] / ref['train']:.2f}x",
                      f"{row['peak'] / ref['peak']:.2f}x"]
        lines.append(
            f"| {row['name']} | {row['b8']:.1f} | {row['b1']:.1f} | {row['train']:.3f} | {row['peak']:.0f} | "
            + ' | '.join(ratios) + ' |')
    return '\n'.join(lines)


def speedups(rows: List[Dict[str, float]]) -> str:
    by_name = {row['name']: row for row in rows}
    lines = []
    for row in rows:
        base = by_name.get('unfold:' + row['name'])
        if base is not None:
            lines.append(
                f"{row['name']} vs its unfold implementation: b8 {row['b8'] / base['b8']:.2f}x faster, "
                f"b1 {row['b1'] / base['b1']:.2f}x faster, train step {base['train'] / row['train']:.2f}x faster, "
                f"train memory {base['peak'] / row['peak']:.2f}x less")
    return '\n'.join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--models', nargs='+', default=list(DEFAULT_MODELS),
                        help='timm model names; unfold:<san model> for the unfold baseline')
    parser.add_argument('--device', default='cpu', help='cpu or cuda')
    parser.add_argument('--threads', type=int, default=2, help='CPU threads (torch.set_num_threads)')
    parser.add_argument('--rounds', type=int, default=3, help='interleaved rounds; medians are reported')
    parser.add_argument('--b1-repeat', type=int, default=4, help='batch-1 forwards per round')
    parser.add_argument('--repeat', type=int, default=None,
                        help='calls timed together per measurement (default 1 on CPU, 10 on CUDA, where one call '
                             'takes milliseconds)')
    parser.add_argument('--train-batch', type=int, default=16)
    parser.add_argument('--reference', default='resnet26', help='model the ratios are taken against')
    args = parser.parse_args()

    device = torch.device(args.device)
    if args.repeat is None:
        args.repeat = 10 if device.type == 'cuda' else 1
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    precisions = [('fp32', None)]
    if device.type == 'cuda':
        precisions.append(('bf16 autocast', torch.bfloat16))
        hardware = torch.cuda.get_device_name(device)
    else:
        hardware = f'CPU, {torch.get_num_threads()} threads'
    print(f'torch {torch.__version__}, timm {timm.__version__}, {hardware}; 224px, eval inference at batch 8 and 1, '
          f'training step at batch {args.train_batch}; median of {args.rounds} interleaved rounds\n')
    for label, dtype in precisions:
        load_before = os.getloadavg()[0]
        rows = run(args, device, dtype)
        load = f'load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after'
        print(f'### {args.device} {label} ({load}; a load above the thread count means a shared, noisy run)\n')
        print(table(rows, args.reference, args.train_batch))
        print()
        print(speedups(rows))
        print()


if __name__ == '__main__':
    main()
