""" Pretrained weights of the SAN models: reading, checking, converting, downloading and publishing them

    checkpoint.py   reading official checkpoints safely; what is wrong with a damaged file; the misfit check
    sources.py      the record of the official checkpoints (official_checkpoints.json: Drive ids, sha256)
    conversion.py   an official checkpoint -> a folder timm loads (local-dir:) and the Hub takes
    model_card.py   the README.md model card of such a folder
    download.py     the official checkpoints from the release's Google Drive, checked and converted into a cache
    publish.py      converted folders -> Hugging Face Hub repositories
    hub_ids.py      the Hub organisation of the pretrained cfgs
    hub_errors.py   fast, clear errors for pretrained weights that cannot be fetched or read

Nothing is imported here, so that each module loads only what it needs.
"""
