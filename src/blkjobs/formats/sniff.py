"""What a name or a file's first bytes say about an image, before any driver
is imported: NBD URIs by their scheme, qemu-img's other name syntaxes by their prefix
(:func:`is_spec`), LUKS and qcow2 by their magic. Kept apart from
the drivers so that commands that only look (``info``, ``map``) do not pay
for importing the NBD client or LUKS cryptography (start-up time)."""
from __future__ import annotations

SCHEMES = ("nbd", "nbds", "nbd+unix", "nbds+unix", "nbd+tcp", "nbds+tcp",
           "nbd+vsock", "nbds+vsock")
LUKS_MAGIC = b"LUKS\xba\xbe"
QCOW2_MAGIC = b"QFI\xfb"      # formats.qcow2.header.MAGIC, big-endian


def is_qcow2(head: bytes) -> bool:
    """``head`` (a file's first bytes) starts with the qcow2 magic."""
    return head[:4] == QCOW2_MAGIC


#: the names that are ``--image-opts`` option strings (:func:`mark_image_opts`)
_image_opts: set[str] = set()


def mark_image_opts(name: str) -> None:
    """``name`` is an ``--image-opts`` option string, not a file name."""
    _image_opts.add(name)


def is_image_opts(name: str) -> bool:
    """``name`` was marked an ``--image-opts`` string (:func:`mark_image_opts`)."""
    return name in _image_opts


def is_spec(name: str) -> bool:
    """``name`` is one of qemu-img's other image-name syntaxes
    (``json:``, ``file:``, ``blkdebug:``, an ``--image-opts`` string: read by
    :mod:`blkjobs.graph.blockspec`), not a plain file name. Here, not there:
    a command on plain file names does not import the reader of those."""
    return name in _image_opts or name.startswith(("json:", "file:", "blkdebug:"))


def is_nbd_uri(name: str) -> bool:
    """``name`` is an NBD URI (by its scheme), not a file name."""
    scheme, sep, _ = name.partition("://")
    return bool(sep) and scheme.lower() in SCHEMES
