""" Distributed training of SAN: DistributedDataParallel over 2 CPU processes (gloo) under torchrun, SyncBatchNorm

The processes run ``script_fixtures/ddp_train.py`` through the launcher (``torchrun ... -m timm_san run``), as the
README shows for timm's scripts.

SyncBatchNorm's forward in training needs a GPU (PyTorch refuses CPU tensors there, and with one process it falls
back to plain BatchNorm), so here only the conversion is checked; training with it needs several GPUs.
"""
import json
import os
import subprocess
import sys

import torch
import torch.nn as nn

import timm
import timm_san  # noqa: F401  registers the SAN models
from timm.layers import convert_sync_batchnorm

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'script_fixtures', 'ddp_train.py')


def test_ddp_replicas_stay_identical(tmp_path):
    report_path = tmp_path / 'report.json'
    env = dict(os.environ, OMP_NUM_THREADS='1')
    command = [
        sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
        '-m', 'timm_san', 'run', WORKER, '--report', str(report_path), '--steps', '3']
    proc = subprocess.run(command, cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    with open(report_path) as f:
        report = json.load(f)
    assert report['world_size'] == 2 and report['backend'] == 'gloo'
    # the ranks were seeded differently (as timm's train.py seeds them) and saw different batches ...
    assert report['init_param_diff'] > 0
    assert report['control_param_diff'] > 0, 'without DDP the replicas should drift apart'
    assert report['buffer_diff_before_distribute_bn'] > 0
    # ... yet DDP's initial broadcast and gradient averaging keep the replicas identical, bit for bit
    assert report['param_change'] > 0, 'training did not move the weights'
    assert report['param_diff'] == 0.0
    assert report['buffer_diff'] == 0.0
    assert all(torch.isfinite(torch.tensor(report['losses_rank0'])))


def test_sync_batchnorm_conversion_keeps_checkpoint_layout():
    model = timm.create_model('san10_pairwise', num_classes=3).eval()
    keys = list(model.state_dict())
    num_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)

    converted = convert_sync_batchnorm(model).eval()
    # every BatchNorm, the SAM's own included, becomes a SyncBatchNorm; no plain BatchNorm2d is left behind
    assert sum(isinstance(m, nn.SyncBatchNorm) for m in converted.modules()) == num_bn > 0
    assert not any(type(m) is nn.BatchNorm2d for m in converted.modules())
    # same parameter names, so checkpoints written with --sync-bn load into a plain model and back
    assert list(converted.state_dict()) == keys
    with torch.no_grad():
        # in eval SyncBatchNorm uses the running statistics and needs no process group or GPU
        torch.testing.assert_close(converted(x), expected)

