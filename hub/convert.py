#!/usr/bin/env python3
""" ``timm-san convert`` from a checkout: an official SAN checkpoint -> a folder ready for the Hugging Face Hub

    python hub/convert.py model_best.pth --model san10_pairwise --out hub-out/san10_pairwise.orig_in1k

The code is the installed package's (``timm_san/cli/convert.py``); see ``timm-san convert --help``.
"""
import sys

from timm_san.cli.convert import main

if __name__ == '__main__':
    sys.exit(main(prog='convert.py'))
