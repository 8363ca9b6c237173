""" The paper's ImageNet figures for the six released SAN models

Zhao, Jia, Koltun, "Exploring Self-attention for Image Recognition", CVPR 2020 (ImageNet val, 224 crop of
a 256 resize). The one table the demo and the model cards quote, so a figure is corrected here or nowhere.
"""
from typing import Dict, NamedTuple

__all__ = ['PaperResult', 'PAPER_RESULTS', 'CITATION', 'PAPER_URL', 'OFFICIAL_CODE_URL']

PAPER_URL = 'https://arxiv.org/abs/2004.13621'
OFFICIAL_CODE_URL = 'https://github.com/hszhao/SAN'

CITATION = """@inproceedings{zhao2020exploring,
  title={Exploring Self-attention for Image Recognition},
  author={Zhao, Hengshuang and Jia, Jiaya and Koltun, Vladlen},
  booktitle={Proceedings of the IEEE/CVF Conference on Computer Vision and Pattern Recognition (CVPR)},
  year={2020}
}"""


class PaperResult(NamedTuple):
    """One row of the paper's ImageNet table."""
    top1: float
    top5: float
    params_m: float
    gflops: float


PAPER_RESULTS: Dict[str, PaperResult] = {
    'san10_pairwise': PaperResult(74.9, 92.1, 10.5, 2.2),
    'san10_patchwise': PaperResult(77.1, 93.5, 11.8, 1.9),
    'san15_pairwise': PaperResult(76.6, 93.1, 14.1, 3.0),
    'san15_patchwise': PaperResult(78.0, 93.9, 16.2, 2.6),
    'san19_pairwise': PaperResult(76.9, 93.4, 17.6, 3.8),
    'san19_patchwise': PaperResult(78.2, 93.9, 20.5, 3.3),
}
