#!/usr/bin/env python3
""" Train a SAN for a few steps with DistributedDataParallel on CPU (gloo), under torchrun

    torchrun --standalone --nproc_per_node 2 -m timm_san run ddp_train.py --report report.json

(``python -m torch.distributed.run`` is ``torchrun``.) The script does not import ``timm_san`` itself: the
launcher registers the SAN models in each process, as it does for timm's scripts under torchrun.

Each process seeds itself with its rank, as timm's train.py does, so the replicas start from different weights
and see different batches. DistributedDataParallel broadcasts rank 0's weights when it wraps the model and
averages the gradients at every step, so the replicas must stay identical. A control copy of the model,
trained on the same batches without DDP, shows that the comparison would see replicas drift apart. The
BatchNorm running statistics, which DDP does not average, are reduced across processes at the end with
timm's ``distribute_bn``, as timm's train.py does after each epoch (``--dist-bn reduce``).

Rank 0 writes the largest difference between replicas of the parameters, buffers and the control's
parameters, and how far training moved the weights, to ``--report``.
"""
import argparse
import copy
import json
from typing import Iterable, List

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

import timm
from timm.utils import distribute_bn

parser = argparse.ArgumentParser(description='a few DDP training steps of a SAN on CPU')
parser.add_argument('--report', required=True, help='JSON file rank 0 writes the comparison to')
parser.add_argument('--model', default='san10_patchwise')
parser.add_argument('--steps', type=int, default=3)
parser.add_argument('--batch-size', type=int, default=2)
parser.add_argument('--img-size', type=int, default=64)
parser.add_argument('--num-classes', type=int, default=3)


def _flat(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.detach().double().reshape(-1) for t in tensors])


def _max_diff_across_ranks(vector: torch.Tensor) -> float:
    """Largest absolute difference between this process's ``vector`` and rank 0's, over all processes."""
    reference = vector.clone()
    dist.broadcast(reference, src=0)
    diff = (vector - reference).abs().max()
    dist.all_reduce(diff, op=dist.ReduceOp.MAX)
    return diff.item()


def _train(model: nn.Module, batches: List[tuple], lr: float = 0.01) -> List[float]:
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
    losses = []
    model.train()
    for images, targets in batches:
        loss = nn.functional.cross_entropy(model(images), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def main() -> None:
    args = parser.parse_args()
    dist.init_process_group('gloo')
    rank, world_size = dist.get_rank(), dist.get_world_size()

    torch.manual_seed(42 + rank)  # as timm's train.py: utils.random_seed(args.seed, args.rank)
    model = timm.create_model(args.model, num_classes=args.num_classes)
    init_diff = _max_diff_across_ranks(_flat(model.parameters()))

    # no device_ids on CPU: DDP takes the module's device (timm's train.py passes device_ids, see the README)
    ddp_model = DistributedDataParallel(model)
    start = _flat(model.parameters())
    control = copy.deepcopy(model)

    g = torch.Generator().manual_seed(1000 + rank)
    batches = [
        (torch.randn(args.batch_size, 3, args.img_size, args.img_size, generator=g),
         torch.randint(0, args.num_classes, (args.batch_size,), generator=g))
        for _ in range(args.steps)]
    losses = _train(ddp_model, batches)
    _train(control, batches)

    buffer_diff_before = _max_diff_across_ranks(_flat(b for b in model.buffers() if b.is_floating_point()))
    distribute_bn(ddp_model, world_size, reduce=True)

    report = {
        'world_size': world_size,
        'backend': dist.get_backend(),
        'init_param_diff': init_diff,
        'param_diff': _max_diff_across_ranks(_flat(model.parameters())),
        'buffer_diff_before_distribute_bn': buffer_diff_before,
        'buffer_diff': _max_diff_across_ranks(_flat(model.buffers())),
        'control_param_diff': _max_diff_across_ranks(_flat(control.parameters())),
        'param_change': (_flat(model.parameters()) - start).abs().max().item(),
        'losses_rank0': losses,
    }
    if rank == 0:
        with open(args.report, 'w') as f:
            json.dump(report, f, indent=1)
    dist.destroy_process_group()


if __name__ == '__main__':
    main()
