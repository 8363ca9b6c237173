""" Demo: every SAN model created through timm, run on an image through timm's own data pipeline

    python -m timm_san demo [--image PATH] [--pretrained] [--models san10_*]
"""
import argparse
import time
from typing import List, Optional

import torch
import timm
from PIL import Image, ImageDraw
from torch.utils.flop_counter import FlopCounterMode

from . import fusable
from .paper import PAPER_RESULTS


def drawn_image(size: int = 320) -> Image.Image:
    """A picture drawn here, so the demo needs no download: a sun over hills under a sky."""
    image = Image.new('RGB', (size, size), (135, 190, 235))
    draw = ImageDraw.Draw(image)
    draw.ellipse((size * 0.6, size * 0.1, size * 0.85, size * 0.35), fill=(250, 215, 60))
    draw.polygon([(0, size), (0, size * 0.6), (size * 0.4, size * 0.45), (size, size * 0.7), (size, size)],
                 fill=(70, 140, 60))
    draw.rectangle((size * 0.2, size * 0.55, size * 0.35, size * 0.75), fill=(150, 80, 50))
    return image


def measured_gmacs(model: torch.nn.Module, input_size) -> float:
    """Multiply-accumulates (G) of the convolutions and the classifier, counted by torch's FlopCounterMode.

    The attention arithmetic (subtraction, softmax, aggregation) is element-wise and not counted. The count runs
    the plain modules: the CPU eval fusions compute some of these maps in forms the counter does not see.
    """
    counter = FlopCounterMode(display=False)
    devices = fusable.EVAL_FUSION_DEVICES
    fusable.EVAL_FUSION_DEVICES = ()
    try:
        with counter, torch.no_grad():
            model(torch.zeros(1, *input_size))
    finally:
        fusable.EVAL_FUSION_DEVICES = devices
    return counter.get_total_flops() / 2 / 1e9


def run(model_names: List[str], image: Image.Image, pretrained: bool) -> List[dict]:
    rows = []
    for name in model_names:
        model = timm.create_model(name, pretrained=pretrained).eval()
        data_config = timm.data.resolve_data_config(model=model)
        transform = timm.data.create_transform(**data_config)
        batch = transform(image).unsqueeze(0)
        start = time.perf_counter()
        with torch.no_grad():
            probs = model(batch).softmax(dim=-1)
        elapsed = time.perf_counter() - start
        top_prob, top_class = probs.max(dim=-1)
        rows.append(dict(
            name=name,
            params=sum(p.numel() for p in model.parameters()) / 1e6,
            gmacs=measured_gmacs(model, data_config['input_size']),
            input=tuple(batch.shape),
            top_class=int(top_class), top_prob=float(top_prob),
            ms=elapsed * 1e3,
            paper_top1=PAPER_RESULTS[name].top1 if name in PAPER_RESULTS else None,
        ))
    return rows


def format_table(rows: List[dict]) -> str:
    lines = [
        '| model | params (M) | GMACs @224, conv+fc (measured) | input | top class (p) | forward (ms) | paper top-1 |',
        '|' + '---|' * 7,
    ]
    for r in rows:
        paper = f"{r['paper_top1']:.1f}" if r['paper_top1'] is not None else '-'
        lines.append(
            f"| {r['name']} | {r['params']:.1f} | {r['gmacs']:.2f} | {'x'.join(map(str, r['input']))} | "
            f"{r['top_class']} ({r['top_prob']:.3f}) | {r['ms']:.0f} | {paper} |")
    return '\n'.join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog='timm-san demo', description=__doc__.splitlines()[1])
    parser.add_argument('--image', help='image file to classify (default: a picture drawn by the demo)')
    parser.add_argument('--pretrained', action='store_true', help='load pretrained weights from the Hub')
    parser.add_argument('--models', default='san*', help='timm model name filter (default: san*)')
    args = parser.parse_args(argv)

    import timm_san  # noqa: F401  registers the models

    names = timm.list_models(args.models)
    if not names:
        parser.error(f'no registered model matches {args.models!r}; see timm.list_models("san*")')
    image = Image.open(args.image).convert('RGB') if args.image else drawn_image()
    source = args.image or 'a picture drawn by the demo'
    weights = 'pretrained' if args.pretrained else 'random (untrained; pass --pretrained for Hub weights)'
    print(f'timm {timm.__version__}, torch {torch.__version__}; image: {source}; weights: {weights}')
    print(format_table(run(names, image, args.pretrained)))
    return 0
