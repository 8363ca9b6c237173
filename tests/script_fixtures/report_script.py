#!/usr/bin/env python3
""" A stand-in for timm's scripts (validate.py, ...) in tests of ``timm-san run``

Like timm's scripts it parses its command line with argparse, imports what it needs at the top (here a module
beside it, found through ``sys.path[0]``), creates models by name with ``timm.create_model`` and runs ``main()``
only under ``if __name__ == '__main__'``. It writes what it saw of its environment to ``--report`` as JSON, and
can exit with a code or a message, or raise, to test how the launcher passes those on.
"""
import argparse
import json
import os
import sys

import torch
import timm

import report_helper

parser = argparse.ArgumentParser(description='stand-in for a timm script')
parser.add_argument('--report', default='', help='write what the script saw to this JSON file')
parser.add_argument('--model', default='san10_patchwise', help='model to look up (and create with --create)')
parser.add_argument('--create', action='store_true', help='create the model (3 classes) and run it on one image')
parser.add_argument('--exit-code', type=int, default=None, help='sys.exit with this code')
parser.add_argument('--exit-message', default=None, help='sys.exit with this message')
parser.add_argument('--raise-error', default=None, help='raise RuntimeError with this message')


def fail(message: str) -> None:
    # a frame of the script's own below main(), so that tracebacks can be compared frame by frame
    raise RuntimeError(message)


def main() -> None:
    args = parser.parse_args()
    report = {
        'name': __name__,
        'file': __file__,
        'argv': sys.argv,
        'prog': parser.prog,
        'path0': sys.path[0],
        'cwd_on_path': os.getcwd() in sys.path or '' in sys.path,
        'neighbour': report_helper.NEIGHBOUR,
        'model_registered': timm.is_model(args.model),
        'logits_shape': None,
    }
    if args.report:
        with open(args.report, 'w') as f:
            json.dump(report, f)
    if args.create:
        model = timm.create_model(args.model, num_classes=3).eval()
        with torch.no_grad():
            report['logits_shape'] = list(model(torch.randn(1, 3, 32, 32)).shape)
        with open(args.report, 'w') as f:
            json.dump(report, f)
    if args.raise_error is not None:
        fail(args.raise_error)
    if args.exit_message is not None:
        sys.exit(args.exit_message)
    if args.exit_code is not None:
        sys.exit(args.exit_code)


if __name__ == '__main__':
    main()
