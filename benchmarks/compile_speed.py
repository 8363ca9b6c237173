""" ``torch.compile`` on CPU: the first compiled call, then compiled against eager, SAN against resnet26

Each model and mode runs in a fresh process with an empty Inductor cache of its own (``TORCHINDUCTOR_CACHE_DIR``
in a temporary folder: the cold first call a user sees once), at ``--threads`` threads. Eval is batch 8 under
``torch.no_grad``; training is one SGD step at batch 16. After the first call, compiled and eager calls are timed
interleaved, minimum of ``--rounds``, wall time.

    python benchmarks/compile_speed.py
    python benchmarks/compile_speed.py --models san10_pairwise --modes train --rounds 5
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

_WORKER = """
import json, sys, time
import torch, torch.nn.functional as F, timm
import timm_san
name, mode, threads, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(threads)
model = timm.create_model(name).train(mode == 'train')
x = torch.randn(8 if mode == 'eval' else 16, 3, 224, 224)
target = torch.randint(0, 1000, (x.shape[0],))
optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
def step(fn):
    if mode == 'eval':
        with torch.no_grad():
            fn(x)
    else:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(fn(x), target).backward()
        optimizer.step()
compiled = torch.compile(model)
start = time.perf_counter()
step(compiled)
first = time.perf_counter() - start
step(compiled), step(model)
times = {'compiled': [], 'eager': []}
for _ in range(rounds):
    for key, fn in (('compiled', compiled), ('eager', model)):
        start = time.perf_counter()
        step(fn)
        times[key].append(time.perf_counter() - start)
print(json.dumps({'first': first, **{k: min(v) for k, v in times.items()}}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument('--models', nargs='+', default=['resnet26', 'san10_patchwise', 'san10_pairwise'])
    parser.add_argument('--modes', nargs='+', default=['eval', 'train'], choices=['eval', 'train'])
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--rounds', type=int, default=3)
    args = parser.parse_args()
    print(f'{args.threads} thread(s), wall time; eval b8, training step b16 (SGD); a cold Inductor cache\n')
    print('| model | mode | first compiled call s | compiled s | eager s | compiled / eager |')
    print('|---|---|---:|---:|---:|---:|')
    for mode in args.modes:
        for name in args.models:
            with tempfile.TemporaryDirectory() as cache:
                env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache)
                result = subprocess.run(
                    [sys.executable, '-c', _WORKER, name, mode, str(args.threads), str(args.rounds)],
                    env=env, stdout=subprocess.PIPE, text=True, check=True)
            r = json.loads(result.stdout.strip().splitlines()[-1])
            print(f'| {name} | {mode} | {r["first"]:.1f} | {r["compiled"]:.3f} | {r["eager"]:.3f} | '
                  f'{r["compiled"] / r["eager"]:.2f} |', flush=True)


if __name__ == '__main__':
    main()
