"""Compressed cluster codecs: raw deflate (QEMU's "zlib") and zstd.

zstd needs the optional ``zstandard`` module; without it, reading or writing
a zstd image raises a clear :class:`ImageError` (only when a compressed
cluster is actually touched).
"""
from __future__ import annotations

import zlib
from types import ModuleType

from ...errors import ImageError

_ZSTD_MODULE: list[ModuleType | None] = []


def _zstd() -> ModuleType | None:
    """The optional ``zstandard`` module or None, imported on first use
    (2 ms that no command pays unless it meets a zstd cluster)."""
    if not _ZSTD_MODULE:
        mod: ModuleType | None
        try:
            import zstandard
            mod = zstandard
        except ImportError:  # pragma: no cover - depends on the environment
            mod = None
        _ZSTD_MODULE.append(mod)
    return _ZSTD_MODULE[0]

DEFLATE, ZSTD = 0, 1


def decompress(ctype: int, data: bytes, cluster_size: int) -> bytes:
    """Inflate one cluster; the input may carry trailing bytes of the next
    compressed cluster (its sector count is rounded up), which are ignored."""
    try:
        if ctype == DEFLATE:
            d = zlib.decompressobj(-15)
            out = d.decompress(data, cluster_size)
        elif ctype == ZSTD:
            zstd = _zstd()
            if zstd is None:
                raise ImageError("zstd-compressed cluster found but the 'zstandard' "
                                 "module is not installed")
            out = zstd.ZstdDecompressor().decompressobj().decompress(data)[:cluster_size]
        else:
            raise ImageError(f"unknown compression type {ctype}")
    except (zlib.error, ValueError) as e:
        raise ImageError(f"corrupt compressed cluster: {e}") from None
    except Exception as e:  # zstandard.ZstdError
        if isinstance(e, ImageError):
            raise
        raise ImageError(f"corrupt compressed cluster: {e}") from None
    if len(out) != cluster_size:
        raise ImageError(f"compressed cluster inflates to {len(out)} bytes, "
                         f"expected {cluster_size}")
    return out


def compress(ctype: int, data: bytes) -> bytes:
    if ctype == DEFLATE:
        c = zlib.compressobj(6, zlib.DEFLATED, -12)
        return c.compress(data) + c.flush()
    if ctype == ZSTD:
        zstd = _zstd()
        if zstd is None:
            raise ImageError("writing zstd-compressed clusters needs the 'zstandard' module")
        return zstd.ZstdCompressor().compress(data)
    raise ImageError(f"unknown compression type {ctype}")
