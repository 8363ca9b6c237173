""" SAN deployed, against resnet26 in the same runtime: ONNX Runtime and AOTInductor, b8 224 at 1 and 2 threads

ONNX: each model exported once (the legacy exporter with a dynamic batch, as timm's ``onnx_export.py`` does by
default; ``--dynamo`` for the dynamo exporter), then run by ONNX Runtime sessions of 1 and 2 intra-op threads.
AOTInductor (``--aoti``): ``torch.export`` then ``torch._inductor.aoti_compile_and_package``, the package loaded
and run with torch's threads set to 1 and 2 (SAN's package calls the attention operators of the process, which
must import ``timm_san``). Models interleaved round by round, minimum over the rounds, wall time.

    python benchmarks/onnx_speed.py
    python benchmarks/onnx_speed.py --models resnet26 san10_pairwise --rounds 5 --dynamo --aoti
"""
import argparse
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import onnxruntime as ort
import torch
import timm

import timm_san  # noqa: F401  (registers the SAN models)


def export(name: str, path: str, dynamo: bool) -> float:
    model = timm.create_model(name).eval()
    x = torch.randn(2, 3, 224, 224)
    start = time.perf_counter()
    if dynamo:
        batch = torch.export.Dim('batch', min=1, max=64)
        torch.onnx.export(model, (x,), path, dynamo=True, dynamic_shapes=({0: batch},))
    else:
        torch.onnx.export(model, (x,), path, dynamo=False, input_names=['input'], output_names=['output'],
                          dynamic_axes={'input': {0: 'batch'}, 'output': {0: 'batch'}}, opset_version=17)
    return time.perf_counter() - start


def aoti_package(name: str, path: str) -> float:
    model = timm.create_model(name).eval()
    start = time.perf_counter()
    program = torch.export.export(model, (torch.randn(8, 3, 224, 224),))
    torch._inductor.aoti_compile_and_package(program, package_path=path)
    return time.perf_counter() - start


def aoti_rates(paths: dict, threads_list, rounds: int, batch: int) -> dict:
    x = torch.randn(batch, 3, 224, 224)
    runners = {n: torch._inductor.aoti_load_package(p) for n, p in paths.items()}
    rates = {n: {} for n in paths}
    for threads in threads_list:
        torch.set_num_threads(threads)
        with torch.no_grad():
            for runner in runners.values():
                runner(x)
            times = {n: [] for n in runners}
            for _ in range(rounds):
                for n, runner in runners.items():
                    start = time.perf_counter()
                    runner(x)
                    times[n].append(time.perf_counter() - start)
        for n in runners:
            rates[n][threads] = batch / min(times[n])
    return rates


def table(title: str, rates: dict, build_s: dict, threads_list, reference: str) -> None:
    print(f'**{title}**\n')
    print('| model | export s |' + ''.join(f' {t} thread(s) img/s | vs {reference} |' for t in threads_list))
    print('|---|---:|' + '---:|---:|' * len(threads_list))
    for name in rates:
        cells = ''.join(f' {rates[name][t]:.1f} | {rates[name][t] / rates[reference][t]:.2f}x |' for t in threads_list)
        print(f'| {name} | {build_s[name]:.0f} |{cells}')
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--models', nargs='+', default=['resnet26', 'san10_patchwise', 'san10_pairwise'])
    parser.add_argument('--threads', type=int, nargs='+', default=[1, 2])
    parser.add_argument('--rounds', type=int, default=5)
    parser.add_argument('--batch', type=int, default=8)
    parser.add_argument('--dynamo', action='store_true', help='the dynamo exporter (default: the legacy one)')
    parser.add_argument('--aoti', action='store_true', help='AOTInductor packages too')
    args = parser.parse_args()
    print(f'torch {torch.__version__}, onnxruntime {ort.__version__}, '
          f'{"dynamo" if args.dynamo else "legacy"} exporter, b{args.batch} 224px\n')
    print('uptime before:', subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip(), '\n')
    x = np.random.default_rng(0).standard_normal((args.batch, 3, 224, 224)).astype(np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        paths, export_s = {}, {}
        for name in args.models:
            paths[name] = os.path.join(tmp, f'{name}.onnx')
            export_s[name] = export(name, paths[name], args.dynamo)
        rows = {name: {} for name in args.models}
        for threads in args.threads:
            options = ort.SessionOptions()
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
            sessions = {n: ort.InferenceSession(p, options, providers=['CPUExecutionProvider'])
                        for n, p in paths.items()}
            for session in sessions.values():  # warm up
                session.run(None, {session.get_inputs()[0].name: x})
            times = {n: [] for n in sessions}
            for _ in range(args.rounds):
                for n, session in sessions.items():
                    start = time.perf_counter()
                    session.run(None, {session.get_inputs()[0].name: x})
                    times[n].append(time.perf_counter() - start)
            for n in sessions:
                rows[n][threads] = args.batch / min(times[n])
        if args.aoti:
            packages, package_s = {}, {}
            for name in args.models:
                packages[name] = os.path.join(tmp, f'{name}.pt2')
                package_s[name] = aoti_package(name, packages[name])
            aoti = aoti_rates(packages, args.threads, args.rounds, args.batch)
    exporter = 'dynamo' if args.dynamo else 'legacy'
    table(f'ONNX Runtime ({exporter} exporter)', rows, export_s, args.threads, args.models[0])
    if args.aoti:
        table('AOTInductor (torch.export)', aoti, package_s, args.threads, args.models[0])
    print('\nuptime after:', subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip())


if __name__ == '__main__':
    sys.exit(main())
