"""Formats layer: image drivers (raw, qcow2) behind :class:`base.Driver`.

* :func:`probe_format` — 'qcow2' when the file starts with the qcow2 magic,
  else 'raw';
* :func:`open_image` — open with an explicit or probed format. A file that
  looks like qcow2 is opened as raw only when ``fmt='raw'`` is explicit (so a
  guest cannot turn its raw disk into a qcow2 naming host files);
* :func:`create_image` — create an image of a format;
* :func:`register_filter`, :func:`filter_wrap` — the filter layers
  (``blkdebug``) a layer above puts over a driver.

The package imports no driver and not the driver contract (:mod:`.base`):
``Driver``, ``Kind`` and ``Mapping`` are imported from it when first
asked for (a raw -> raw convert uses no driver: ~1.4 M instructions, a
module and seven classes, of its start-up).
"""
from __future__ import annotations

import os
import sys

from ..errors import ImageError, NotAnImageFile, UsageError  # noqa: F401  (re-exported)
from .cache import open_file
from .sniff import LUKS_MAGIC, is_nbd_uri, is_qcow2, is_spec  # noqa: F401  (is_spec: re-exported)
from ..native import dio

TYPE_CHECKING = False     # typing.TYPE_CHECKING without importing typing (start-up)
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any, TypeAlias

    from .base import Driver, Kind, Mapping

    _Wrap: TypeAlias = Callable[[Driver, dict[str, Any]], Driver]

FORMATS = ("raw", "qcow2", "luks")

__all__ = ["Driver", "Kind", "Mapping", "FORMATS", "probe_format", "open_image",
           "create_image"]

#: the names of :mod:`.base` this package re-exports, imported on first use
_FROM_BASE = ("Driver", "Kind", "Mapping")


def __getattr__(name: str) -> Any:
    if name in _FROM_BASE:
        from . import base
        return getattr(base, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


#: filter driver name -> wrap(driver, the layer's options) -> driver: the
#: filters a layer above provides (``blkdebug``, the job layer's), put over
#: a driver by :mod:`blkjobs.graph.blockspec`
_FILTERS: dict[str, _Wrap] = {}


def register_filter(driver: str, wrap: _Wrap) -> None:
    """How a filter layer (``blkdebug``) is put over the driver under it."""
    _FILTERS[driver] = wrap


def filter_wrap(driver: str) -> _Wrap | None:
    """The wrap a filter layer registered for ``driver`` (None: not a filter)."""
    return _FILTERS.get(driver)


def probe_format(path: str) -> str:
    # the magic, not the qcow2 driver: a raw -> raw convert never imports it
    if is_nbd_uri(path):
        return "raw"        # an NBD export's bytes are the disk (see formats.nbd)
    try:
        fd = open_file(path)
    except OSError as e:
        raise ImageError(f"could not open '{path}': {e.strerror}") from None
    try:
        head = dio.pread(fd, 8, 0)
    finally:
        os.close(fd)
    return "qcow2" if is_qcow2(head) else "luks" if head[:6] == LUKS_MAGIC else "raw"


def open_image(path: str, fmt: str | None = None, read_only: bool = True,
               key_secret: str | None = None, header_only: bool = False,
               data_file: str | None = None) -> Driver:
    """Open ``path`` as ``fmt`` (probed when None). An NBD URI opens the
    ``nbd`` driver (format raw; qcow2 read-only). An encrypted image (luks, encrypted
    qcow2) is unlocked with the secret ``key_secret`` (:mod:`.secrets`);
    without one it opens only with ``header_only`` (what ``info`` reads).
    ``data_file``: a qcow2 image's external data file, in place of the one
    its header names (the ``data-file`` option)."""
    if is_nbd_uri(path):
        if fmt == "qcow2":      # read-only (formats.nbd_qcow2)
            from .nbd_qcow2 import open_qcow2
            return open_qcow2(path, read_only, header_only)
        if fmt not in (None, "raw"):
            raise UsageError(f"'{path}': only the raw and qcow2 formats are supported over NBD")
        from .nbd import Nbd
        return Nbd(path, read_only=read_only)
    if fmt is None:
        fmt = probe_format(path)
    if key_secret is None and fmt in ("qcow2", "luks") and f"{__name__}.secrets" in sys.modules:
        # (a key is bound only through that module: not imported, none is)
        from .secrets import bound_key
        key_secret = bound_key(path)
    try:
        if fmt == "qcow2":
            from .qcow2 import Qcow2
            if _qcow2_encrypted(path):
                from .qcow2.crypt import CryptQcow2
                return CryptQcow2(path, read_only, key_secret, header_only)
            return Qcow2(path, read_only=read_only, header_only=header_only,
                         data_file=data_file)
        if fmt == "luks":
            from .luks import Luks
            return Luks(path, read_only, key_secret, header_only)
        if fmt == "raw":
            from .raw import Raw
            return Raw(path, read_only=read_only)
    except FileNotFoundError:
        raise ImageError(f"could not open '{path}': No such file or directory") from None
    except PermissionError:
        raise ImageError(f"could not open '{path}': Permission denied") from None
    raise UsageError(f"unknown image format '{fmt}' (supported: {', '.join(FORMATS)})")


def _qcow2_encrypted(path: str) -> bool:
    """The qcow2 header's crypt_method field is set."""
    fd = open_file(path)
    try:
        head = dio.pread(fd, 36, 0)
    finally:
        os.close(fd)
    return len(head) == 36 and int.from_bytes(head[32:36], "big") != 0


def is_encrypted(path: str, fmt: str | None) -> bool:
    """``path`` (format ``fmt``, probed when None) is an encrypted image."""
    if is_nbd_uri(path) or not os.path.exists(path):
        return False
    fmt = fmt or probe_format(path)
    return fmt == "luks" or (fmt == "qcow2" and _qcow2_encrypted(path))


def create_image(path: str, fmt: str, size: int | None, **opts) -> None:
    """Create an image. qcow2 options: cluster_size, extended_l2, backing_file,
    backing_format, preallocation ('off'|'metadata'), compat ('1.1'|'0.10'),
    refcount_bits. A backing file without a format is probed; ``size=None``
    takes the backing file's size. raw options: preallocation ('off'|'falloc')."""
    if fmt == "qcow2":
        from .qcow2.create import create as create_qcow2
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
        enc = _encryption({k: opts.pop(k) for k in list(opts) if k.startswith("encrypt")})
        create_qcow2(path, size, **opts)
        if enc is not None:
            from .qcow2.crypt import add_luks_area, set_aes
            if enc[0] == "luks":
                add_luks_area(path, enc[2], enc[1])
            else:
                set_aes(path)
            from .secrets import bind_key
            bind_key(path, enc[1].key_secret)      # opened with its key from now on
    elif fmt == "luks":
        from .luks import create as create_luks
        if size is None:
            raise UsageError("image size is required")
        create_luks(path, size, **opts)
        from .secrets import bind_key
        bind_key(path, opts.get("key_secret"))
    elif fmt == "raw":
        from .raw import create as create_raw
        if size is None:
            raise UsageError("image size is required")
        create_raw(path, size, **opts)
    else:
        raise UsageError(f"unknown image format '{fmt}' (supported: {', '.join(FORMATS)})")


def _encryption(enc: dict) -> tuple[str, Any, bytes] | None:
    """``encrypt.format=luks|aes`` (``encryption=on``: aes) with
    ``encrypt.key-secret`` and the LUKS options ``encrypt.cipher-alg``...:
    (format, LUKS options, password) for :mod:`.qcow2.crypt`, checked before
    anything is created; None: not encrypted."""
    if not enc:         # not encrypted: spares the import of luks (hashlib, uuid)
        return None
    from .luks import parse_create_opts
    from .secrets import secret
    fmt = enc.pop("encrypt.format", None)
    if enc.pop("encryption", False):
        if fmt not in (None, "aes"):
            raise UsageError("Conflicting options 'encryption' and 'encrypt.format'")
        fmt = "aes"
    o = parse_create_opts(enc, "encrypt.")
    if enc:
        raise UsageError(f"Invalid parameter '{sorted(enc)[0]}'")
    if fmt is None:
        return None
    if fmt not in ("luks", "aes"):
        raise UsageError(f"Parameter 'encrypt.format' does not accept value '{fmt}'")
    if o.key_secret is None:
        raise UsageError("Parameter 'encrypt.key-secret' is required for cipher")
    o.check()
    return fmt, o, secret(o.key_secret)
