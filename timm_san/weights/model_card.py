""" The README.md model card of a converted SAN checkpoint, laid out as timm's Hub cards are

The card is written by timm's own ``generate_readme`` from a card dict (metadata block with library_name,
license, tags and dataset; model details; usage; comparison; citation); this module only says what goes in it.
"""
from typing import Any, Dict, Optional

from timm.models._hub import generate_readme

from ..paper import CITATION, OFFICIAL_CODE_URL, PAPER_RESULTS, PAPER_URL
from .sources import OfficialSource

__all__ = ['model_card_text']

TAGS = ['image-classification', 'timm', 'timm-san', 'self-attention']
LICENSE = 'mit'  # the official release (code and shared models) is MIT licensed


def _usage(repo_id: str) -> str:
    return f"""### Image classification
```python
import timm
import timm_san  # registers the SAN models with timm
import torch
from PIL import Image

model = timm.create_model('hf-hub:{repo_id}', pretrained=True).eval()
data_config = timm.data.resolve_model_data_config(model)
transform = timm.data.create_transform(**data_config, is_training=False)

img = Image.open('image.jpg').convert('RGB')
with torch.no_grad():
    top5_prob, top5_idx = model(transform(img).unsqueeze(0)).softmax(dim=-1).topk(5)
```

### Feature maps
```python
model = timm.create_model('hf-hub:{repo_id}', pretrained=True, features_only=True).eval()
features = model(transform(img).unsqueeze(0))  # five maps, strides 2, 4, 8, 16, 32
```
"""


def _comparison(model_name: str) -> str:
    rows = ['| model | top-1 | top-5 | params (M) | FLOPs (G) |', '|---|---|---|---|---|']
    for name, result in PAPER_RESULTS.items():
        shown = f'**{name}**' if name == model_name else name
        rows.append(f'| {shown} | {result.top1} | {result.top5} | {result.params_m} | {result.gflops} |')
    return ('ImageNet-1k validation, 224 crop of a 256 resize, as reported in the paper:\n\n'
            + '\n'.join(rows) + '\n')


def model_card_text(
        model_name: str,
        repo_id: str,
        source: OfficialSource,
        source_file_name: str,
        source_sha256: str,
        num_params: int,
        checkpoint_extra: Optional[Dict[str, Any]] = None,
        converter: str = 'timm-san convert',
) -> str:
    """The model card of one converted checkpoint.

    Args:
        model_name: timm architecture, e.g. ``'san10_pairwise'``.
        repo_id: Hub repository the card is for, used in the usage snippet.
        source: Record of the official checkpoint.
        source_file_name: Name of the file converted.
        source_sha256: Its sha256.
        num_params: Parameters of the converted model.
        checkpoint_extra: The checkpoint's own top-level entries (epoch, top1_val, top5_val).
        converter: What converted it.

    Returns:
        README.md text.
    """
    paper = PAPER_RESULTS[model_name]
    sa_type = model_name.split('_')[1]
    extra = checkpoint_extra or {}
    recorded = ', '.join(
        f'{key} {extra[key]}' for key in ('epoch', 'top1_val', 'top5_val') if isinstance(extra.get(key), (int, float)))
    weights = {
        'Converted from': f'the official checkpoint `{source_file_name}` ({source.official_path} in the release)',
        'Source sha256': f'`{source_sha256}`',
        'Official release': source.release_folder + (f' (this file: {source.url})' if source.drive_file_id else ''),
        'Recorded in the checkpoint': recorded or 'nothing besides the weights',
        'Conversion': f'{converter}: weights unchanged (DataParallel `module.` prefix dropped), saved as safetensors; '
                      f'outputs checked equal to the checkpoint\'s before writing',
    }
    card = {
        'tags': TAGS,
        'license': LICENSE,
        'description': (
            f'A SAN ({sa_type} self-attention) image classification model trained on ImageNet-1k by the paper\'s '
            f'authors, converted from their released checkpoint for timm by timm-san.'),
        'details': {
            'Model Type': 'Image classification / feature backbone',
            'Model Stats': {
                'Params (M)': f'{num_params / 1e6:.1f} (paper: {paper.params_m})',
                'FLOPs (G, paper)': paper.gflops,
                'Image size': '224 x 224',
            },
            'Papers': {'Exploring Self-attention for Image Recognition': PAPER_URL},
            'Original': OFFICIAL_CODE_URL,
            'Dataset': 'ImageNet-1k',
            'Weights': weights,
        },
        'usage': _usage(repo_id),
        'comparison': _comparison(model_name),
        'citation': CITATION,
    }
    return generate_readme(card, repo_id.split('/')[-1])
