""" The command line of timm-san: ``timm-san COMMAND ...`` (also ``python -m timm_san COMMAND ...``)

    main.py      the dispatcher and ``--version``
    demo.py      ``timm-san demo``: every SAN model created through timm, run on an image
    download.py  ``timm-san download``: the official weights, checked and converted into a cache folder
    run.py       ``timm-san run``: a script (timm's validate.py, ...) run with the SAN models registered
    convert.py   ``timm-san convert``: an official checkpoint file -> a Hub-ready folder (hub/convert.py)
    upload.py    ``timm-san upload``: converted folders -> Hub repositories (hub/publish.py)
    publish.py   ``timm-san publish``: download, verify, record sha256, convert and upload, for a Hub token holder
"""
