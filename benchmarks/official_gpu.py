""" timm_san against the official SAN release on a CUDA GPU: output parity, speed and training memory

The official release (https://github.com/hszhao/SAN) runs its operators as CUDA kernels compiled at run time
through CuPy. This script imports its ``model/san.py`` from a checkout given on the command line (nothing of it
is part of timm_san), loads the same weights into both networks and reports:

* parity: eval logits, and a train-mode forward + backward (logits, input and parameter gradients), relative
  errors of ours against the official kernels;
* speed: eval throughput at the given batch, and the training step time (forward, cross-entropy, backward, SGD);
* memory: the peak a training step allocates (``torch.cuda.max_memory_allocated``) at batch 32, the batch of the
  paper's memory figures (official SAN10 at batch 32 per GPU: pairwise 13.1 GB, patchwise 9.0 GB), both above
  what was held before the step and in total.

The release was written against CuPy's old ``cupy.util.memoize`` / ``cupy.cuda.compile_with_cache`` API; a small
module written here stands in for its ``lib/sa/functions/utils.py`` with today's ``cupy.RawModule``.

    python benchmarks/official_gpu.py --official /path/to/SAN
"""
import argparse
import functools
import os
import statistics
import string
import sys
import time
import types
from collections import namedtuple
from typing import Callable, Dict, List, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
import timm

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _ROOT)
sys.path.insert(0, os.path.join(_ROOT, 'tests'))
import timm_san  # noqa: F401,E402  (registers the SAN models)
from reference import randomize_  # noqa: E402
from timm_san import ops  # noqa: E402

LAYERS = {'san10': (2, 1, 2, 4, 1), 'san15': (3, 2, 3, 5, 2), 'san19': (3, 3, 4, 6, 3)}
KERNELS = (3, 7, 7, 7, 7)


def install_cupy_compat() -> None:
    """Provide ``lib.sa.functions.utils`` (Dtype, Stream, load_kernel) on today's CuPy before the release imports it."""
    import cupy

    def dtype_name(t: torch.Tensor) -> str:
        names = {torch.float32: 'float', torch.float64: 'double'}
        if t.dtype not in names:
            raise TypeError(f'the official kernels run float32 and float64 only, got {t.dtype}')
        return names[t.dtype]

    @functools.lru_cache(maxsize=None)
    def compile_kernel(device: int, kernel_name: str, code: str):
        with cupy.cuda.Device(device):
            return cupy.RawModule(code=code).get_function(kernel_name)

    def load_kernel(kernel_name: str, code: str, **kwargs):
        kernel = compile_kernel(torch.cuda.current_device(), kernel_name, string.Template(code).substitute(**kwargs))

        def launch(block, grid, args, stream):
            with cupy.cuda.ExternalStream(stream.ptr):
                kernel(grid, block, tuple(args))
        return launch

    module = types.ModuleType('lib.sa.functions.utils')
    module.Dtype, module.Stream, module.load_kernel = dtype_name, namedtuple('Stream', ['ptr']), load_kernel
    module.__all__ = ['Dtype', 'Stream', 'load_kernel']
    sys.modules['lib.sa.functions.utils'] = module


def official_model(root: str, name: str) -> nn.Module:
    """The release's network for a timm_san model name (e.g. ``san10_pairwise``)."""
    install_cupy_compat()
    sys.path.insert(0, root)
    from model.san import san
    depth, sa_type = name.split('_')
    return san(sa_type=0 if sa_type == 'pairwise' else 1, layers=LAYERS[depth], kernels=list(KERNELS),
               num_classes=1000)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def parity(ours: nn.Module, official: nn.Module, batch: int) -> Dict[str, float]:
    """Relative errors of ours against the official kernels, eval and train (forward and backward)."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 3, 224, 224, generator=gen).cuda()
    out = {}
    with torch.no_grad():
        out['eval logits'] = rel_err(ours.eval()(x), official.eval()(x))
    results = []
    for model in (ours, official):
        model.train().zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_(True)
        logits = model(xi)
        (logits.float().square().mean()).backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        results.append((logits.detach(), xi.grad, grads))
    out['train logits'] = rel_err(results[0][0], results[1][0])
    out['train logits, largest |difference| / largest |logit|'] = (
        (results[0][0] - results[1][0]).abs().max() / results[1][0].abs().max()).item()
    out['input grad'] = rel_err(results[0][1], results[1][1])
    names = sorted(results[1][2])
    out['all parameter grads'] = rel_err(torch.cat([results[0][2][n].flatten() for n in names]),
                                         torch.cat([results[1][2][n].flatten() for n in names]))
    # a bias followed by a BatchNorm (conv1/conv2 of SAM, conv_p) has a true gradient of zero: skip such noise
    largest = max(results[1][2][n].norm().item() for n in names)
    live = [n for n in names if results[1][2][n].norm().item() > 1e-4 * largest]
    worst = max(live, key=lambda n: rel_err(results[0][2][n], results[1][2][n]))
    out[f'worst parameter grad ({worst}; {len(names) - len(live)} near-zero grads skipped)'] = rel_err(
        results[0][2][worst], results[1][2][worst])
    return out


def timed(fn: Callable[[], None], repeat: int) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeat


class Bench:
    """Eval and training closures of one model.

    ``kernels`` is the ``timm_san.ops.use_kernels`` setting the closures run under.
    """

    def __init__(self, model: nn.Module, batch: int, autocast: bool, kernels: str = 'all'):
        self.model, self.autocast, self.kernels = model, autocast, kernels
        self.optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        gen = torch.Generator().manual_seed(0)
        self.x = torch.randn(batch, 3, 224, 224, generator=gen).cuda()
        self.y = torch.randint(0, 1000, (batch,), generator=gen).cuda()

    def infer(self) -> None:
        self.model.eval()
        with torch.inference_mode(), torch.autocast('cuda', dtype=torch.bfloat16, enabled=self.autocast), \
                ops.use_kernels(self.kernels):
            self.model(self.x)

    def step(self) -> None:
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        with ops.use_kernels(self.kernels):
            with torch.autocast('cuda', dtype=torch.bfloat16, enabled=self.autocast):
                loss = F.cross_entropy(self.model(self.x), self.y)
            loss.backward()
        self.optimizer.step()

    def peak(self) -> Tuple[float, float, float]:
        """(GiB allocated by one step above what was held, GiB allocated in total at the peak, GiB reserved)."""
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        self.step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        return (peak - base) / 2 ** 30, peak / 2 ** 30, torch.cuda.max_memory_reserved() / 2 ** 30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--official', required=True, help='path of a checkout of github.com/hszhao/SAN')
    parser.add_argument('--models', nargs='+', default=['san10_pairwise', 'san10_patchwise'])
    parser.add_argument('--batch', type=int, default=32, help='batch of the speed and memory runs')
    parser.add_argument('--parity-batch', type=int, default=4)
    parser.add_argument('--rounds', type=int, default=5)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit('official_gpu.py needs a CUDA GPU: the official operators are CUDA kernels only.')
    torch.backends.cudnn.benchmark = True
    # the paper's figures are fp32; TF32 convolutions would blur the parity check
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    print(f'torch {torch.__version__}, timm {timm.__version__}, {torch.cuda.get_device_name()}, batch {args.batch}\n')
    for name in args.models:
        ours = randomize_(timm.create_model(name)).cuda()
        official = official_model(args.official, name).cuda()
        official.load_state_dict(ours.state_dict())
        print(f'## {name}\n')
        print('parity (relative error of timm_san against the official kernels, fp32, batch '
              f'{args.parity_batch}):')
        for key, value in parity(ours, official, args.parity_batch).items():
            print(f'  {key}: {value:.2e}')
        ours.load_state_dict(official.state_dict())  # the parity run's training step moved BN statistics
        rows: List[Tuple[str, Bench]] = [
            ('official (CuPy kernels, fp32)', Bench(official, args.batch, False)),
            ('timm_san fp32', Bench(ours, args.batch, False)),
            ('timm_san fp32, reference kernels', Bench(ours, args.batch, False, kernels='reference')),
            ('timm_san bf16 autocast', Bench(ours, args.batch, True)),
        ]
        times: Dict[str, Dict[str, List[float]]] = {label: {'eval': [], 'train': []} for label, _ in rows}
        for _, bench in rows:
            bench.infer(), bench.step()
        for _ in range(args.rounds):
            for label, bench in rows:
                times[label]['eval'].append(timed(bench.infer, 3))
                times[label]['train'].append(timed(bench.step, 2))
        print(f'\n| implementation | eval img/s b{args.batch} | train s/step b{args.batch} | step peak GiB '
              '(above held) | peak GiB allocated (total) | peak GiB reserved |')
        print('|---|---:|---:|---:|---:|---:|')
        results = {}
        for label, bench in rows:
            step_peak, total, reserved = bench.peak()
            results[label] = (args.batch / statistics.median(times[label]['eval']),
                              statistics.median(times[label]['train']), step_peak, total, reserved)
            print(f'| {label} | {results[label][0]:.0f} | {results[label][1]:.3f} | {step_peak:.2f} | {total:.2f} '
                  f'| {reserved:.2f} |')
        off = results['official (CuPy kernels, fp32)']
        for label, r in results.items():
            if label.startswith('official'):
                continue
            print(f'{label} vs official: eval {r[0] / off[0]:.2f}x faster, train step {off[1] / r[1]:.2f}x faster, '
                  f'total training memory {off[3] / r[3]:.2f}x less')
        print()
        del rows, ours, official
        torch.cuda.empty_cache()


if __name__ == '__main__':
    main()
