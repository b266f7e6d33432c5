"""``drive-backup`` and ``drive-mirror``: the older commands that name the
target by file name. As QEMU's do_drive_backup and qmp_drive_mirror
(blockdev.c), the target image is created (``mode`` ``absolute-paths``, the
default) or opened as it is (``existing``), then the job is the same one
``blockdev-backup``/``blockdev-mirror`` start.

* ``format``: default the source's format (``absolute-paths``), probed for
  ``existing``; blkjobs creates and opens ``qcow2`` and ``raw`` only.
* The new image's backing file, as QEMU writes it: drive-backup ``sync=top``
  the source's backing image (``full`` when there is none), ``sync=none``
  the source itself (and the target's backing node *is* the source);
  drive-mirror ``sync=top`` the source's backing image, ``none`` the source,
  ``full`` none. The target is opened without opening that backing file:
  it is linked to the source's node in memory, as QEMU does.
* The target is a node the monitor does not own (auto-named ``#blockN``, or
  drive-mirror's ``node-name``): it goes when its job ends (QEMU drops its
  last reference when the job is cleaned up).
"""
from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from ..formats import create_image, open_image, probe_format
from ..graph import Node
from ..jobmodel import JobTxn
from .protocol import QMPError

_FORMATS = ("qcow2", "raw")


class DriveCommands:
    """drive-backup and drive-mirror (mixed into Commands)."""

    eng: Any
    nodes: dict
    # from NodeCommands / JobCommands
    _lookup: Callable[[str], Node]
    _check_job_blockers: Callable[..., None]
    _check_new_name: Callable[[str], None]
    _start_backup: Callable[..., Any]
    cmd_blockdev_mirror: Callable[..., Any]

    def _drive_targets(self) -> dict[str, Node]:
        targets: dict[str, Node] | None = getattr(self, "_drive_target_nodes", None)
        if targets is None:
            targets = {}
            self._drive_target_nodes = targets
        return targets

    def _prune_drive_targets(self) -> None:
        """Close the targets whose job has ended (concluded or gone)."""
        targets = self._drive_targets()
        for job_id, g in list(targets.items()):
            job = self.eng.jobs.get(job_id)
            if job is None or job.status.value in ("concluded", "null"):
                del targets[job_id]
                if self.eng.graph.nodes.get(g.name) is g and not self.eng.graph.parents(g):
                    g.close()

    def _create_drive_target(self, path: str, fmt: str, size: int, backing: Node | None) -> None:
        if fmt not in _FORMATS:
            raise QMPError(f"blkjobs creates '{', '.join(_FORMATS)}' images only, not "
                           f"'{fmt}'")
        opts: dict[str, Any] = {}
        if backing is not None:
            if fmt == "raw":
                raise QMPError("Backing file not supported for file format 'raw'")
            opts = {"backing_file": backing.filename, "backing_format": backing.format}
        try:
            create_image(path, fmt, size, **opts)
        except OSError as e:
            raise QMPError(f"Could not create '{path}': {e.strerror}") from None

    def _open_drive_target(self, path: str, fmt: str | None, name: str | None,
                     backing: Node | None) -> Node:
        try:
            os.close(os.open(path, os.O_RDWR))
            if fmt is None:
                fmt = probe_format(path)
            drv = open_image(path, fmt, read_only=False)
        except OSError as e:
            raise QMPError(f"Could not open '{path}': {e.strerror}") from None
        if fmt not in _FORMATS:
            drv.close()
            raise QMPError(f"blkjobs opens '{', '.join(_FORMATS)}' images only, not '{fmt}'")
        return self.eng.graph.add(drv, name, fmt).hold_open(
            backing if fmt == "qcow2" else None)

    def _drive_target(self, src: Node, args: dict[str, Any], sync: str, backing: Node | None,
                      name: str | None = None) -> Node:
        mode = args.pop("mode", "absolute-paths")
        fmt = args.pop("format", None)
        path = args.pop("target")
        if fmt is None and mode != "existing":
            fmt = src.format
        if mode != "existing":
            assert fmt is not None
            self._create_drive_target(path, fmt, src.size, backing)
        return self._open_drive_target(path, fmt, name, backing)

    # ------------------------------------------------------------------

    def _start_drive_backup(self, args: dict[str, Any], txn: JobTxn | None = None) -> Any:
        args = dict(args)
        src = self._lookup(args["device"])
        with self.eng.io:
            self._check_job_blockers(src)
            sync = args["sync"]
            backing: Node | None = None
            if sync == "top":
                backing = src.below_filters().backing
                if backing is None:
                    sync = args["sync"] = "full"
            elif sync == "none":
                backing = src
            g = self._drive_target(src, args, sync, backing)
        args["target"] = g.name
        try:
            job = self._start_backup(args, txn)
        except BaseException:
            with self.eng.io:
                g.close()
            raise
        self._drive_targets()[job.id] = g
        return job

    def cmd_drive_backup(self, **args: Any) -> dict[str, Any]:
        self._start_drive_backup(args)
        return {}

    def cmd_drive_mirror(self, **args: Any) -> dict[str, Any]:
        name = args.pop("node-name", None)
        if "replaces" in args and name is None:
            raise QMPError("a node-name must be provided when replacing a named node of "
                           "the graph")
        dev = args["device"]
        src = self.eng.graph.nodes.get(dev)
        if src is None:
            raise QMPError(f"Cannot find device='{dev}' nor node-name='{dev}'")
        with self.eng.io:
            if self.eng.graph.parents(src):
                raise QMPError("Need a root block node")
            self._check_job_blockers(src)
            if name is not None:
                self._check_new_name(name)
            sync = args["sync"]
            backing = src.below_filters().backing
            if backing is None and sync == "top":
                sync = args["sync"] = "full"
            if sync == "none":
                backing = src
            elif sync == "full":
                backing = None
            if args.get("mode") == "existing":
                backing = None if sync == "full" else backing
            # QEMU zeroes the target first only for sync=full into an image
            # it did not create (a new file or qcow2 image reads as zeroes)
            new = args.get("mode", "absolute-paths") != "existing"
            g = self._drive_target(src, args, sync, backing, name)
        args["target"] = g.name
        if sync == "full" and new:
            args["target-is-zero"] = True
        try:
            self.cmd_blockdev_mirror(**args)
        except BaseException:
            with self.eng.io:
                g.close()
            raise
        self._drive_targets()[args.get("job-id", "")] = g
        return {}
