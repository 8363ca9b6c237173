#!/usr/bin/env python3
""" ``timm-san upload`` from a checkout: folders written by convert.py -> Hugging Face Hub repositories

    python hub/publish.py hub-out/san10_pairwise.orig_in1k --repo-id timm-san/san10_pairwise.orig_in1k
    python hub/publish.py hub-out/* --dry-run      # several, each to the repository its config.json names

The code is the installed package's (``timm_san/cli/upload.py``). To download, verify, convert and publish all six
official checkpoints in one go: ``timm-san publish --all [--dry-run]``.
"""
import sys

from timm_san.cli.upload import main

if __name__ == '__main__':
    sys.exit(main(prog='publish.py'))
