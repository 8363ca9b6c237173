""" SAN exported to ONNX against resnet26 in ONNX Runtime: b8 224 throughput at 1 and 2 threads

Each model is exported once (the legacy exporter with a dynamic batch, as timm's ``onnx_export.py`` does by
default; ``--dynamo`` for the dynamo exporter), then run by ONNX Runtime sessions of 1 and 2 intra-op threads,
models interleaved round by round, minimum over the rounds (wall time; ONNX Runtime has its own thread pool).

    python benchmarks/onnx_speed.py
    python benchmarks/onnx_speed.py --models resnet26 san10_pairwise --rounds 5 --dynamo
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--models', nargs='+', default=['resnet26', 'san10_patchwise', 'san10_pairwise'])
    parser.add_argument('--threads', type=int, nargs='+', default=[1, 2])
    parser.add_argument('--rounds', type=int, default=5)
    parser.add_argument('--batch', type=int, default=8)
    parser.add_argument('--dynamo', action='store_true', help='the dynamo exporter (default: the legacy one)')
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
    reference = args.models[0]
    head = '| model | export s |' + ''.join(f' {t} thread(s) img/s | vs {reference} |' for t in args.threads)
    print(head)
    print('|---|---:|' + '---:|---:|' * len(args.threads))
    for name in args.models:
        cells = ''.join(f' {rows[name][t]:.1f} | {rows[name][t] / rows[reference][t]:.2f}x |' for t in args.threads)
        print(f'| {name} | {export_s[name]:.0f} |{cells}')
    print('\nuptime after:', subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip())


if __name__ == '__main__':
    sys.exit(main())
