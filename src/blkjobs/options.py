"""The job and image options that are enumerations, as :class:`enum.StrEnum`.

Each member is its QMP string (``SyncMode.FULL == "full"``, and
``str(SyncMode.FULL) == "full"``), so the :class:`~blkjobs.Engine` takes
either the member or QEMU's string; a string outside the enumeration is
refused by the job with QEMU's error text (``Parameter 'sync' does not accept
value 'fast'``), as before::

    eng.backup("disk", "bk", sync=SyncMode.FULL, on_target_error=ErrorPolicy.STOP)
    eng.backup("disk", "bk", sync="full", on_target_error="stop")     # the same

=====================  ========================================================
``sync``               :class:`SyncMode` (QMP ``MirrorSyncMode``)
``copy_mode``          :class:`CopyMode` (``MirrorCopyMode``)
``bitmap_mode``        :class:`BitmapMode` (``BitmapSyncMode``)
``on_*_error``         :class:`ErrorPolicy` (``BlockdevOnError``, of the job core)
``on_cbw_error``       :class:`OnCbwError` (``OnCbwError``)
``cache`` (open)       :class:`CacheMode` (qemu-img ``-t``: the two blkjobs has)
``completion_mode``    :class:`CompletionMode` (of the job core)
=====================  ========================================================
"""
from __future__ import annotations

import enum
from typing import TypeVar

from .jobmodel.job import ErrorPolicy
from .jobmodel.txn import CompletionMode

__all__ = ["BitmapMode", "CacheMode", "CompletionMode", "CopyMode", "ErrorPolicy", "OnCbwError",
           "SyncMode", "coerce"]


class SyncMode(enum.StrEnum):
    """``MirrorSyncMode``: what a backup or mirror copies. Mirror takes
    ``full``, ``top`` and ``none``."""

    FULL = "full"
    TOP = "top"
    NONE = "none"
    INCREMENTAL = "incremental"
    BITMAP = "bitmap"


class CopyMode(enum.StrEnum):
    """``MirrorCopyMode``: whether guest writes wait for the target."""

    BACKGROUND = "background"
    WRITE_BLOCKING = "write-blocking"


class BitmapMode(enum.StrEnum):
    """``BitmapSyncMode``: what a backup does with its bitmap at the end."""

    ON_SUCCESS = "on-success"
    ALWAYS = "always"
    NEVER = "never"


class OnCbwError(enum.StrEnum):
    """``OnCbwError``: a failed copy-before-write fails the guest write or
    the backup."""

    BREAK_GUEST_WRITE = "break-guest-write"
    BREAK_SNAPSHOT = "break-snapshot"


class CacheMode(enum.StrEnum):
    """How an image is written: ``writeback`` flushes, ``unsafe`` never
    fsyncs (qemu-img's ``-t unsafe``)."""

    WRITEBACK = "writeback"
    UNSAFE = "unsafe"


E = TypeVar("E", bound=enum.Enum)
V = TypeVar("V")


def coerce(cls: type[E], value: V) -> E | V:
    """``value`` as a member of ``cls`` when it is one of its values; any
    other value (None, a typo) is returned unchanged, for the caller's
    check to refuse with QEMU's text."""
    if value is None or isinstance(value, cls):
        return value
    try:
        return cls(value)
    except (ValueError, TypeError):
        return value
