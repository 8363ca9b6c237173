""" SAN on one CUDA GPU: eval throughput and training step time at batch 32, fp32 and bf16 autocast

Models interleaved round by round, minimum over the rounds (CUDA events around each call); against timm's
resnet26 / resnet50 and against the official release's arithmetic written with ``F.unfold`` (``unfold:<model>``,
``tests/reference.py``, the same weights). Peak memory of a training step: ``torch.cuda.max_memory_allocated``
above what was held before it. One table per precision.

    python benchmarks/gpu_bench.py
    python benchmarks/gpu_bench.py --models san19_pairwise resnet50 --rounds 5
"""
import argparse
import contextlib
import os
import sys
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F
import timm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import timm_san  # noqa: F401,E402  (registers the SAN models)
from unfold_baseline import unfold_model  # noqa: E402

DEFAULT_MODELS = ('resnet26', 'resnet50', 'san10_patchwise', 'san10_pairwise', 'san19_patchwise', 'san19_pairwise',
                  'unfold:san10_patchwise', 'unfold:san10_pairwise')


def create(name: str) -> torch.nn.Module:
    if name.startswith('unfold:'):
        san = name.split(':', 1)[1]
        model = unfold_model(san)
        model.load_state_dict(timm.create_model(san).state_dict())
        return model
    return timm.create_model(name)


def cuda_time(fn: Callable[[], None]) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--models', nargs='+', default=list(DEFAULT_MODELS))
    parser.add_argument('--batch', type=int, default=32)
    parser.add_argument('--rounds', type=int, default=3)
    parser.add_argument('--reference', default='resnet26')
    args = parser.parse_args()
    device = torch.device('cuda')
    print(f'{torch.cuda.get_device_name(device)}, torch {torch.__version__}, batch {args.batch}, 224px\n')
    x = torch.randn(args.batch, 3, 224, 224, device=device)
    target = torch.randint(0, 1000, (args.batch,), device=device)
    for label, dtype in (('fp32', None), ('bf16 autocast', torch.bfloat16)):
        ctx = (lambda: torch.autocast('cuda', dtype=dtype)) if dtype else contextlib.nullcontext
        models = {n: create(n).to(device) for n in args.models}
        optimizers = {n: torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9) for n, m in models.items()}

        def infer(n: str) -> None:
            models[n].eval()
            with torch.inference_mode(), ctx():
                models[n](x)

        def train(n: str) -> None:
            models[n].train()
            optimizers[n].zero_grad(set_to_none=True)
            with ctx():
                loss = F.cross_entropy(models[n](x), target)
            loss.backward()
            optimizers[n].step()

        for n in models:
            infer(n), train(n)
        times: Dict[str, Dict[str, List[float]]] = {n: {'eval': [], 'train': []} for n in models}
        for _ in range(args.rounds):
            for n in models:
                times[n]['eval'].append(cuda_time(lambda: infer(n)))
                times[n]['train'].append(cuda_time(lambda: train(n)))
        peaks = {}
        for n in models:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            train(n)
            torch.cuda.synchronize()
            peaks[n] = (torch.cuda.max_memory_allocated() - base) / 2 ** 20
        ref = times.get(args.reference)
        print(f'### {label}\n')
        print(f'| model | eval img/s | vs {args.reference} | train step s | vs {args.reference} | train peak MiB |')
        print('|---|---:|---:|---:|---:|---:|')
        for n, t in times.items():
            rate, step = args.batch / min(t['eval']), min(t['train'])
            eval_ratio = f"{min(ref['eval']) / min(t['eval']):.2f}x" if ref else ''
            train_ratio = f"{step / min(ref['train']):.2f}x" if ref else ''
            print(f'| {n} | {rate:.0f} | {eval_ratio} | {step:.3f} | {train_ratio} | {peaks[n]:.0f} |')
        print()
        del models, optimizers
        torch.cuda.empty_cache()


if __name__ == '__main__':
    main()
