""" Where the pretrained SAN weights live on the Hugging Face Hub

The one place that names the Hub organisation: change ``HF_HUB_ORG`` (or set ``TIMM_SAN_HF_HUB_ORG`` before
importing timm_san) to point every SAN pretrained cfg at another organisation or a mirror's copy.
"""
import os

__all__ = ['HF_HUB_ORG', 'hf_hub_id']

HF_HUB_ORG = os.environ.get('TIMM_SAN_HF_HUB_ORG', 'timm-san')


def hf_hub_id(model_name_tag: str) -> str:
    """Hub repository of a pretrained cfg, e.g. ``'timm-san/san10_pairwise.orig_in1k'``.

    Args:
        model_name_tag: ``'<architecture>.<tag>'``.
    """
    return f'{HF_HUB_ORG}/{model_name_tag}'
