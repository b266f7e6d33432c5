"""qcow2 external data files (docs/qcow2.md §10): the file a ``data-file``
option names for an image (``json:``/``--image-opts``), bound by the image's
path before it is opened, as :func:`blkjobs.formats.secrets.bind_key` binds
a key."""
from __future__ import annotations

import os

_bound: dict[str, str] = {}


def bind_data_file(image: str, data_file: str) -> None:
    """Open ``image`` with the data file ``data_file`` instead of the one
    its header names."""
    _bound[os.path.abspath(image)] = data_file


def bound_data_file(image: str) -> str | None:
    return _bound.get(os.path.abspath(image))
