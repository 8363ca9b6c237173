""" Demo: every SAN model created through timm, run on an image through timm's own data pipeline

    timm-san demo [--image PATH] [--pretrained] [--models 'san10_*'] [--cache-dir DIR]

The forward time is the median of a few calls after a warm-up call (the first call of a model allocates its
buffers and is several times slower). The top class is named with timm's ImageNet labels. With ``--pretrained``
the models load the official weights that ``timm-san download`` put in the cache (``local-dir:``), else the
weights their pretrained cfg names on the Hugging Face Hub; if neither is there, the demo ends with timm-san's
account of why, in a line, and exit code 1. Bad arguments end in a one-line error and exit code 2.
"""
import argparse
import statistics
import sys
import time
from typing import List, Optional

import torch
import timm
from PIL import Image, ImageDraw, UnidentifiedImageError
from timm.data import ImageNetInfo
from torch.utils.flop_counter import FlopCounterMode

from ..paper import PAPER_RESULTS
from ..weights.download import CACHE_ENV, default_cache_dir, folder_for
from ..weights.hub_errors import pretrained_error_summary

PROG = 'timm-san demo'
TIMED_CALLS = 3  # timed after one warm-up call; the median is shown


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

    The attention arithmetic (subtraction, softmax, aggregation) is element-wise and not counted; SAN's operators
    count their convolutions (``timm_san.ops.flops``).
    """
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.zeros(1, *input_size))
    return counter.get_total_flops() / 2 / 1e9


def median_forward_ms(model: torch.nn.Module, batch: torch.Tensor, calls: int = TIMED_CALLS) -> float:
    """Median wall time (ms) of ``calls`` forward calls, after one untimed warm-up call."""
    times = []
    with torch.no_grad():
        model(batch)
        for _ in range(calls):
            start = time.perf_counter()
            model(batch)
            times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def _create(name: str, pretrained: bool, cache_dir: Optional[str]) -> torch.nn.Module:
    """The model, with the official weights of the download cache if they are there, else its cfg's Hub weights."""
    folder = folder_for(name, cache_dir)
    if pretrained and (folder / 'config.json').is_file():
        return timm.create_model(f'local-dir:{folder}', pretrained=True)
    return timm.create_model(name, pretrained=pretrained)


def run(model_names: List[str], image: Image.Image, pretrained: bool, cache_dir: Optional[str] = None) -> List[dict]:
    labels = ImageNetInfo()
    rows = []
    for name in model_names:
        model = _create(name, pretrained, cache_dir).eval()
        data_config = timm.data.resolve_data_config(model=model)
        transform = timm.data.create_transform(**data_config)
        batch = transform(image).unsqueeze(0)
        with torch.no_grad():
            probs = model(batch).softmax(dim=-1)
        top_prob, top_class = probs.max(dim=-1)
        label = (labels.index_to_description(int(top_class), detailed=False)
                 if model.num_classes == labels.num_classes() else str(int(top_class)))
        rows.append(dict(
            name=name,
            params=sum(p.numel() for p in model.parameters()) / 1e6,
            gmacs=measured_gmacs(model, data_config['input_size']),
            input=tuple(batch.shape),
            top_class=int(top_class), top_label=label, top_prob=float(top_prob),
            ms=median_forward_ms(model, batch),
            paper_top1=PAPER_RESULTS[name].top1 if name in PAPER_RESULTS else None,
        ))
    return rows


def format_table(rows: List[dict]) -> str:
    lines = [
        f'| model | params (M) | GMACs @224, conv+fc (measured) | input | top class (p) | '
        f'forward (ms, median of {TIMED_CALLS} warm) | paper top-1 |',
        '|' + '---|' * 7,
    ]
    for r in rows:
        paper = f"{r['paper_top1']:.1f}" if r['paper_top1'] is not None else '-'
        lines.append(
            f"| {r['name']} | {r['params']:.1f} | {r['gmacs']:.2f} | {'x'.join(map(str, r['input']))} | "
            f"{r['top_label']} ({r['top_prob']:.3f}) | {r['ms']:.0f} | {paper} |")
    return '\n'.join(lines)


def _fail(message: str, code: int) -> int:
    print(f'{PROG}: error: {" ".join(message.split())}', file=sys.stderr)
    return code


def _open_image(path: str) -> Image.Image:
    with Image.open(path) as image:
        return image.convert('RGB')


def main(argv: Optional[List[str]] = None) -> int:
    """Run the demo; 0 on success, 1 when pretrained weights cannot be had, 2 for bad arguments."""
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[1])
    parser.add_argument('--image', help='image file to classify (default: a picture drawn by the demo)')
    parser.add_argument('--pretrained', action='store_true',
                        help='load the official weights: from the timm-san download cache, else from the Hub')
    parser.add_argument('--models', default='san*', help='timm model name filter (default: san*)')
    parser.add_argument('--cache-dir', default=None,
                        help=f'the timm-san download cache (default: ${CACHE_ENV}, else {default_cache_dir()})')
    args = parser.parse_args(argv)

    import timm_san  # noqa: F401  registers the models

    names = timm.list_models(args.models)
    if not names:
        return _fail(f'no registered model matches {args.models!r}; the SAN models are '
                     f'{", ".join(timm.list_models("san*"))}', 2)
    try:
        image = _open_image(args.image) if args.image else drawn_image()
    except FileNotFoundError:
        return _fail(f'no image file at {args.image!r}', 2)
    except (UnidentifiedImageError, OSError) as e:
        return _fail(f'cannot read {args.image!r} as an image: {e}', 2)
    source = args.image or 'a picture drawn by the demo'
    weights = ('pretrained (official)' if args.pretrained
               else 'random (untrained; timm-san download, then --pretrained, for the official weights)')
    print(f'timm {timm.__version__}, torch {torch.__version__}; image: {source}; weights: {weights}', flush=True)
    try:
        rows = run(names, image, args.pretrained, args.cache_dir)
    except Exception as e:  # noqa: BLE001  only the pretrained failures timm-san explains end here; others re-raise
        summary = pretrained_error_summary(e) if args.pretrained else None
        if summary is None:
            raise
        return _fail(summary, 1)
    print(format_table(rows))
    return 0
