""" The paper's controlled experiments on SAN10 (its Section 5), as models: one table of cost and speed

Builds each variant of the design space that the paper's ablations vary, one factor at a time from the released
SAN10 (relation function, footprint size, position encoding, depth of the weight mapping), and prints params,
GMACs (measured as ``timm-san demo`` measures them, torch's FlopCounterMode over convs and classifier), eval
throughput at batch 8 and a training step at batch 16 (SGD), both against resnet26 measured in the same process
and round, and which kernel served the attention. One thread, CPU time, minimum of ``--rounds``; ``uptime`` before
and after. Top-1 accuracy is the paper's where ``timm_san.paper`` records it (the released configurations);
the ablations' accuracies need ImageNet training (recipe: docs/training.md).

    python benchmarks/design_space.py
    python benchmarks/design_space.py --only relation --rounds 3
"""
import argparse
import logging
import os
import time
from typing import Dict, List, Tuple

import torch
import torch.nn.functional as F
import timm

from timm_san.cli.demo import measured_gmacs
from timm_san.paper import PAPER_RESULTS

# (study, model, arguments): one factor at a time from the released configuration
VARIANTS: List[Tuple[str, str, Dict]] = [
    ('released', 'san10_pairwise', {}),
    ('released', 'san10_patchwise', {}),
    *[('relation', 'san10_pairwise', dict(relation=r)) for r in ('summation', 'hadamard', 'concatenation', 'dot')],
    *[('relation', 'san10_patchwise', dict(relation=r)) for r in ('star', 'clique')],
    *[('footprint', name, dict(kernels=(3, k, k, k, k))) for name in ('san10_pairwise', 'san10_patchwise')
      for k in (3, 5, 9, 11)],
    ('position', 'san10_pairwise', dict(position_encoding=False)),
    *[('mapping', name, dict(mapping_layers=n)) for name in ('san10_pairwise', 'san10_patchwise') for n in (1, 3)],
]


class KernelLog(logging.Handler):
    """The attention kernels the dispatch names (its debug log)."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.kernels = set()

    def emit(self, record):
        message = record.getMessage()
        if 'attention:' in message:
            self.kernels.add(message.split(': ')[1].split(' kernel')[0])


def _cpu_time(fn) -> float:
    start = time.process_time()
    fn()
    return time.process_time() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument('--only', nargs='+', default=None, help='studies to run: released relation footprint ...')
    parser.add_argument('--rounds', type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)
    log = KernelLog()
    logging.getLogger('timm_san.ops').addHandler(log)
    logging.getLogger('timm_san.ops').setLevel(logging.DEBUG)
    variants = [v for v in VARIANTS if args.only is None or v[0] in args.only]
    print(f'torch {torch.__version__}, 1 thread, CPU time, minimum of {args.rounds} rounds; uptime before: '
          f'{os.getloadavg()[0]:.2f}\n')
    x_eval, x_train = torch.randn(8, 3, 224, 224), torch.randn(16, 3, 224, 224)
    target = torch.randint(0, 1000, (16,))

    def timers(model):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

        def evaluate():
            with torch.inference_mode():
                model.eval()(x_eval)

        def step():
            model.train()
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(x_train), target).backward()
            optimizer.step()
        return evaluate, step

    reference = timers(timm.create_model('resnet26'))
    print('| study | model | arguments | params (M) | GMACs | eval img/s | vs resnet26 | train s/step | vs resnet26 '
          '| attention kernel | paper top-1 |')
    print('|---|---|---|---:|---:|---:|---:|---:|---:|---|---:|')
    for study, name, design in variants:
        model = timm.create_model(name, **design)
        params = sum(p.numel() for p in model.parameters()) / 1e6
        gmacs = measured_gmacs(model, (3, 224, 224))
        mine = timers(model)
        for fn in (*reference, *mine):  # warm up
            fn()
        log.kernels.clear()
        times = {key: [] for key in ('ref_eval', 'ref_step', 'eval', 'step')}
        for _ in range(args.rounds):
            for key, fn in zip(times, (*reference, *mine)):
                times[key].append(_cpu_time(fn))
        best = {key: min(v) for key, v in times.items()}
        arguments = ', '.join(f'{k}={v}' for k, v in design.items()) or '(released)'
        paper = PAPER_RESULTS[name].top1 if not design else None
        print(f'| {study} | {name} | {arguments} | {params:.1f} | {gmacs:.2f} | {8 / best["eval"]:.1f} | '
              f'{best["ref_eval"] / best["eval"]:.2f}x | {best["step"]:.2f} | {best["step"] / best["ref_step"]:.2f}x '
              f'| {", ".join(sorted(log.kernels))} | {"" if paper is None else paper} |', flush=True)
    print(f'\nuptime after: {os.getloadavg()[0]:.2f}')


if __name__ == '__main__':
    main()
