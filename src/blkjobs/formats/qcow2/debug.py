"""blkdebug's events inside the qcow2 driver (QEMU's ``BLKDBG_EVENT`` on
``bs->file`` in block/qcow2*.c): the one place that lists them.

A blkdebug layer between a qcow2 image and its file (``blkdebug:CONF:IMG``,
``"file": {"driver": "blkdebug", ...}``) sets the image's ``blkdebug`` hook
(:class:`Hook`; the job layer's ``QemuRules``). The driver then raises
:data:`EVENTS` at the points QEMU raises them (:func:`event`) and asks the
hook about the file I/O that follows (:func:`io`): once an event made an
inject-error rule active, that I/O fails with the rule's errno, as QEMU's
blkdebug fails every request reaching it. Without a hook both are one
``is None`` test.

Where they are raised:

* ``l1_update``, ``empty_image_prepare``, ``reftable_update``,
  ``refblock_alloc``: emptying an image (``qemu-img commit``;
  :func:`.empty.make_empty`, QEMU's make_completely_empty);
* ``cluster_free``: freeing clusters whose refcount is counted down
  (a replaced snapshot table, QEMU's qcow2_free_clusters).
"""
from __future__ import annotations

import os

TYPE_CHECKING = False     # typing.TYPE_CHECKING without importing typing (start-up)
if TYPE_CHECKING:
    from typing import Protocol
else:
    Protocol = object    # a plain base at run time: the class is for the type checker

#: the events the qcow2 driver raises
EVENTS = ("l1_update", "empty_image_prepare", "reftable_update", "refblock_alloc",
          "cluster_free")


class Hook(Protocol):
    def debug_event(self, event: str) -> None: ...

    def check(self, iotype: str, offset: int, length: int) -> int: ...


def event(hook: Hook | None, name: str) -> None:
    """Raise blkdebug event ``name`` (one of :data:`EVENTS`)."""
    if hook is not None:
        hook.debug_event(name)


def io(hook: Hook | None, iotype: str, offset: int, length: int) -> None:
    """The file I/O about to be done (``read``, ``write``, ``write-zeroes``,
    ``discard``, ``flush``; file offsets): OSError if blkdebug fails it."""
    if hook is not None:
        err = hook.check(iotype, offset, length)
        if err:
            raise OSError(err, os.strerror(err))
