"""``qemu-img snapshot -c/-a/-d`` on an open node: qcow2 internal snapshots
(:mod:`blkjobs.formats.qcow2.snapshot_ops`), qemu-img 7.2's texts for what
fails (other formats have no internal snapshots)."""
from __future__ import annotations

import errno
import os

from ..errors import UsageError


def _qemu_errno(e) -> str:
    return f"-{e.errno} ({os.strerror(e.errno)})"


def create(node, name: str) -> None:
    """Create snapshot ``name``; UsageError with qemu-img's text on failure."""
    from ..formats.qcow2.snapshot_ops import SnapshotError, create as _create
    if node.format != "qcow2":
        raise UsageError(f"Could not create snapshot '{name}': -{errno.ENOTSUP} "
                         f"({os.strerror(errno.ENOTSUP)})")
    try:
        _create(node.driver, name)
    except SnapshotError as e:
        raise UsageError(f"Could not create snapshot '{name}': {_qemu_errno(e)}") from None


def apply(node, name: str) -> None:
    """Revert the active state to snapshot ``name`` (an ID or a name)."""
    from ..formats.qcow2.snapshot_ops import SnapshotError, apply as _apply
    if node.format != "qcow2":
        raise UsageError(f"Could not apply snapshot '{name}': Block driver does not "
                         "support snapshots")
    if node.driver.bitmaps:     # QEMU loads persistent bitmaps as active ones
        raise UsageError(f"Could not apply snapshot '{name}': Device has active dirty bitmaps")
    try:
        _apply(node.driver, name)
    except SnapshotError as e:
        first = "" if str(e) == os.strerror(e.errno) else f"{e}\nblkjobs: "
        raise UsageError(f"{first}Could not apply snapshot '{name}': Failed to load "
                         f"snapshot: {os.strerror(e.errno)}") from None


def delete(node, name: str) -> None:
    """Delete the first snapshot called ``name``."""
    from ..formats.qcow2.snapshot_ops import SnapshotError, delete as _delete
    if node.format != "qcow2":
        raise UsageError(f"Could not delete snapshot '{name}': snapshot not found")
    try:
        _delete(node.driver, name)
    except SnapshotError as e:
        raise UsageError(f"Could not delete snapshot '{name}': {e}") from None


def load_tmp(node, snapshot: tuple[str | None, str | None] | str) -> None:
    """``convert -l``: make the read-only ``node`` read a snapshot: a string
    is an ID, else a name; a pair (ID, name) must match both given ones.
    UsageError with qemu-img's text (and the node closed) when it cannot."""
    from ..formats.qcow2.snapshot_ops import SnapshotError, load_tmp as _load
    try:
        if node.format != "qcow2":
            raise UsageError(f"Block format '{node.format}' used by device '' does not "
                             "support temporarily loading internal snapshots")
        if isinstance(snapshot, str):
            try:
                _load(node.driver, snapshot, None)
            except SnapshotError as e:
                if e.errno not in (errno.ENOENT, errno.EINVAL):
                    raise
                _load(node.driver, None, snapshot)
        else:
            if snapshot == (None, None):
                raise UsageError("snapshot_id and name are both NULL")
            _load(node.driver, *snapshot)
    except (SnapshotError, UsageError) as e:
        node.close_chain()
        raise UsageError(f"Failed to load snapshot: {e}") from None
