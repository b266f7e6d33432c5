"""QEMU's ``quorum`` driver, read-only, as qemu-img opens one: an image
whose file is a set of children (``file`` nodes) holding copies of the
same bytes, read by vote::

    json:{"driver": "qcow2", "file": {"driver": "quorum", "vote-threshold": 1,
          "children": [{"driver": "file", "filename": "a.qcow2"},
                       {"driver": "file", "filename": "b.qcow2"}]}}

QEMU reads every child on each request and returns the version that at
least ``vote-threshold`` children returned. Our drivers read one host file
(the C engine moves bytes between file descriptors), so blkjobs votes once,
on each child's whole contents, when the quorum is opened: the children are
grouped by identical contents, the largest group wins if
it has ``vote-threshold`` members, and the image is then opened over a
file of that group (:func:`elect`). Where the children agree, that reads
exactly what QEMU's per-request vote reads. Children of different sizes
fail as in QEMU (the quorum has no length). Not built: writing through a
quorum (refused), a vote per request (children that differ with no whole
winner are refused, though QEMU might find a winner for every request), and
``blkverify``, ``rewrite-corrupted`` and ``read-pattern`` beyond checking
them as QEMU does; a raw view of a quorum shows the file's own size where
QEMU rounds it up to a multiple of 512.

What qemu-img shows of such an image: its name is the ``json:`` of its
options (the children as a list), the disk size is the children's
together, and a relative backing file name cannot be resolved (a quorum
has no directory: "cannot determine actual path").
"""
from __future__ import annotations

import os
from typing import Any

from ..errors import ImageError

#: bytes compared per step of the vote
_CHUNK = 1 << 20


def check_options(opts: dict[str, Any], nchildren: int) -> int:
    """The vote threshold, QEMU's checks and texts (quorum_open)."""
    thr = opts.get("vote-threshold", 0)
    if isinstance(thr, str):
        try:
            thr = int(thr, 0)
        except ValueError:
            raise ImageError("Parameter 'vote-threshold' expects a number") from None
    if not isinstance(thr, int) or isinstance(thr, bool):
        raise ImageError("Invalid parameter type for 'vote-threshold', expected: integer")
    if nchildren < 1:
        raise ImageError("Number of provided children must be 1 or more")
    if thr < 1:
        raise ImageError("Parameter 'vote-threshold' expects a value >= 1")
    if thr > nchildren:
        raise ImageError("threshold may not exceed children count")
    pattern = opts.get("read-pattern", "quorum")
    if pattern not in ("quorum", "fifo"):
        raise ImageError("Please set read-pattern as fifo or quorum")
    if _flag(opts, "blkverify") and (nchildren != 2 or thr != 2):
        raise ImageError("blkverify=on can only be set if there are exactly two files and "
                         "vote-threshold is 2")
    return thr


def _flag(opts: dict[str, Any], key: str) -> bool:
    v = opts.get(key, False)
    return v is True or v in ("on", "true", "yes")


def elect(paths: list[str], threshold: int) -> str:
    """The child whose whole contents ``threshold`` children share (the
    first of the largest such group); ImageError when there is none or two
    groups tie."""
    groups = _groups(paths)
    best = max(len(g) for g in groups)
    winners = [g for g in groups if len(g) == best]
    if best < threshold or len(winners) > 1:
        raise ImageError(f"quorum: no version of the children's contents has "
                         f"{max(threshold, best + 1) if len(winners) > 1 else threshold} "
                         f"vote(s) (blkjobs votes once on each child's whole contents, "
                         f"not per request)")
    return paths[winners[0][0]]


def _groups(paths: list[str]) -> list[list[int]]:
    """The children's indexes grouped by identical contents."""
    fds = []
    try:
        for p in paths:
            try:
                fds.append(os.open(p, os.O_RDONLY))
            except OSError as e:
                raise ImageError(f"Could not open '{p}': {e.strerror}") from None
        sts = [os.fstat(fd) for fd in fds]
        if len({st.st_size for st in sts}) > 1:     # QEMU's length of a quorum: EIO
            raise ImageError("Could not refresh total sector count: Input/output error")
        groups: list[list[int]] = []
        for i, st in enumerate(sts):
            for g in groups:
                j = g[0]
                if _same(fds[i], fds[j], st, sts[j]):
                    g.append(i)
                    break
            else:
                groups.append([i])
        return groups
    finally:
        for fd in fds:
            os.close(fd)


def _same(a: int, b: int, sa: os.stat_result, sb: os.stat_result) -> bool:
    if (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino):
        return True
    if sa.st_size != sb.st_size:
        return False
    pos = 0
    while pos < sa.st_size:
        if os.pread(a, _CHUNK, pos) != os.pread(b, _CHUNK, pos):
            return False
        pos += _CHUNK
    return True


def disk_size(paths: list[str]) -> int:
    """What qemu-img shows as the quorum's disk size: its children's."""
    total = 0
    for p in paths:
        total += os.stat(p).st_blocks * 512
    return total
