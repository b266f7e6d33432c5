"""Formats layer: image drivers (raw, qcow2) behind :class:`base.Driver`.

* :func:`probe_format` — 'qcow2' when the file starts with the qcow2 magic,
  else 'raw';
* :func:`open_image` — open with an explicit or probed format. A file that
  looks like qcow2 is opened as raw only when ``fmt='raw'`` is explicit (so a
  guest cannot turn its raw disk into a qcow2 naming host files);
* :func:`create_image` — create an image of a format.
"""
from __future__ import annotations

import os

from ..errors import ImageError, UsageError
from .base import Driver, Kind, Mapping, NotAnImageFile, open_file  # noqa: F401

FORMATS = ("raw", "qcow2")

__all__ = ["Driver", "Kind", "Mapping", "FORMATS", "probe_format", "open_image",
           "create_image"]


def probe_format(path: str) -> str:
    from .nbd import is_nbd_uri
    from .qcow2 import probe
    if is_nbd_uri(path):
        return "raw"        # an NBD export's bytes are the disk (see formats.nbd)
    try:
        fd = open_file(path)
    except OSError as e:
        raise ImageError(f"could not open '{path}': {e.strerror}") from None
    try:
        head = os.pread(fd, 8, 0)
    finally:
        os.close(fd)
    return "qcow2" if probe(head) else "raw"


def open_image(path: str, fmt: str | None = None, read_only: bool = True) -> Driver:
    """Open ``path`` as ``fmt`` (probed when None). An NBD URI opens the
    ``nbd`` driver (format raw only)."""
    from .nbd import is_nbd_uri
    if is_nbd_uri(path):
        if fmt not in (None, "raw"):
            raise UsageError(f"'{path}': only the raw format is supported over NBD")
        from .nbd import Nbd
        return Nbd(path, read_only=read_only)
    if fmt is None:
        fmt = probe_format(path)
    try:
        if fmt == "qcow2":
            from .qcow2 import Qcow2
            return Qcow2(path, read_only=read_only)
        if fmt == "raw":
            from .raw import Raw
            return Raw(path, read_only=read_only)
    except FileNotFoundError:
        raise ImageError(f"could not open '{path}': No such file or directory") from None
    except PermissionError:
        raise ImageError(f"could not open '{path}': Permission denied") from None
    raise UsageError(f"unknown image format '{fmt}' (supported: {', '.join(FORMATS)})")


def create_image(path: str, fmt: str, size: int | None, **opts) -> None:
    """Create an image. qcow2 options: cluster_size, extended_l2, backing_file,
    backing_format, preallocation ('off'|'metadata'), compat ('1.1'|'0.10'),
    refcount_bits. A backing file without a format is probed; ``size=None``
    takes the backing file's size. raw options: preallocation ('off'|'falloc')."""
    if fmt == "qcow2":
        from .qcow2 import create as create_qcow2
        bf = opts.get("backing_file")
        if bf and (not opts.get("backing_format") or size is None):
            full = bf if os.path.isabs(bf) else os.path.join(os.path.dirname(os.path.abspath(path)), bf)
            if not opts.get("backing_format"):
                opts["backing_format"] = probe_format(full)
            if size is None:
                with open_image(full, opts["backing_format"]) as b:
                    size = b.size
        if size is None:
            raise UsageError("image size is required")
        create_qcow2(path, size, **opts)
    elif fmt == "raw":
        from .raw import create as create_raw
        if size is None:
            raise UsageError("image size is required")
        create_raw(path, size, **opts)
    else:
        raise UsageError(f"unknown image format '{fmt}' (supported: {', '.join(FORMATS)})")
