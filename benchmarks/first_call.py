""" A fresh process's first forward: from the interpreter's start to the first output, SAN against resnet26

Each measurement is a new Python process that imports torch, timm and timm_san, creates the model in eval mode
and runs one 224px image through it. SAN's first call builds the compiled CPU kernels if the cache holds none for
this machine (cold), or loads them (warm); resnet26 needs neither. The cold runs use an empty cache folder of
their own (``TIMM_SAN_CPP_CACHE``), so the user's cache is left as it is.

    python benchmarks/first_call.py
    python benchmarks/first_call.py --models san10_pairwise --repeats 3
"""
import argparse
import os
import subprocess
import sys
import tempfile

_SCRIPT = """
import time
start = time.perf_counter()
import torch, timm
import timm_san
model = timm.create_model({name!r}).eval()
with torch.no_grad():
    model(torch.randn(1, 3, 224, 224))
print(time.perf_counter() - start)
"""


def first_call(name: str, env: dict) -> float:
    result = subprocess.run([sys.executable, '-c', _SCRIPT.format(name=name)], env=env, capture_output=True,
                            text=True, check=True)
    return float(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--models', nargs='+', default=['san10_patchwise', 'san10_pairwise'])
    parser.add_argument('--reference', default='resnet26')
    parser.add_argument('--repeats', type=int, default=3, help='processes per case; the minimum is reported')
    parser.add_argument('--threads', type=int, default=2)
    args = parser.parse_args()
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    print('uptime before:', subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip(), '\n')
    first_call(args.models[0], env)  # the user's cache warm for the warm runs
    reference = min(first_call(args.reference, env) for _ in range(args.repeats))
    print(f'| model | cache | first output s | beyond {args.reference} |')
    print('|---|---|---:|---:|')
    print(f'| {args.reference} | | {reference:.1f} | |')
    for name in args.models:
        warm = min(first_call(name, env) for _ in range(args.repeats))
        cold = []
        for _ in range(args.repeats):
            with tempfile.TemporaryDirectory() as cache:
                cold.append(first_call(name, dict(env, TIMM_SAN_CPP_CACHE=cache)))
        print(f'| {name} | warm | {warm:.1f} | {warm - reference:+.1f} |')
        print(f'| {name} | cold (builds) | {min(cold):.1f} | {min(cold) - reference:+.1f} |')
    print('\nuptime after:', subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip())


if __name__ == '__main__':
    main()
