""" What a training step keeps for its backward, stage by stage: SAN against timm's ResNets

The forward of a training step (batch 16, 224px) runs under ``torch.autograd.graph.saved_tensors_hooks``; every
tensor saved for the backward is counted once (by its storage, parameters excluded) in the stage whose module was
entered last: the stem (SAN's stem operator runs before any stage module), then each stage with its pool, conv and
norm. The total is the floor of a training step's peak memory, whatever the kernels do; the step's peak adds the
backward's transient gradients.

    python benchmarks/saved_activations.py
    python benchmarks/saved_activations.py --models resnet50 san19_pairwise --batch 8
"""
import argparse
import re
from typing import Dict

import torch
import torch.nn.functional as F
import timm

import timm_san  # noqa: F401  (registers the SAN models)


def stage_of(child: str, is_san: bool) -> str:
    """The stage a top-level child belongs to: SAN's ``pool1``/``layer1``/``bn1`` by their digit, ResNet's
    ``layer1``..``layer4`` by theirs (its ``conv1``/``bn1``/``act1`` are the stem)."""
    stem = ('conv_in', 'bn_in', 'act_in', 'pool0') if is_san else ('conv1', 'bn1', 'act1', 'maxpool')
    if child in stem:
        return 'stem'
    digit = re.search(r'(\d)$', child)
    return f'stage {digit.group(1)}' if digit else 'head'


def saved_by_stage(name: str, batch: int) -> Dict[str, int]:
    model = timm.create_model(name).train()
    is_san = name.startswith('san')
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    current = ['stem']
    for child_name, child in model.named_children():
        label = stage_of(child_name, is_san)
        child.register_forward_pre_hook(lambda module, args, label=label: current.__setitem__(0, label))
    seen = set()
    totals: Dict[str, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key not in seen and key not in params and key != 0:
            seen.add(key)
            totals[current[0]] = totals.get(current[0], 0) + storage.nbytes()
        return tensor

    x = torch.randn(batch, 3, 224, 224)
    target = torch.randint(0, 1000, (batch,))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = F.cross_entropy(model(x), target)
    loss.backward()
    return totals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument('--models', nargs='+', default=['resnet26', 'san10_patchwise', 'san10_pairwise'])
    parser.add_argument('--batch', type=int, default=16)
    args = parser.parse_args()
    results = {name: saved_by_stage(name, args.batch) for name in args.models}
    stages = sorted({s for totals in results.values() for s in totals}, key=lambda s: (s != 'stem', s == 'head', s))
    print(f'Saved for the backward of a training step, batch {args.batch}, 224px, MiB\n')
    print('| stage | ' + ' | '.join(args.models) + ' |')
    print('|---|' + '---:|' * len(args.models))
    for stage in stages:
        print(f'| {stage} | ' + ' | '.join(f'{results[n].get(stage, 0) / 2 ** 20:.0f}' for n in args.models) + ' |')
    print('| **total** | ' + ' | '.join(f'**{sum(results[n].values()) / 2 ** 20:.0f}**' for n in args.models) + ' |')


if __name__ == '__main__':
    main()
