"""``blockdev-create``: a job of type ``create`` that creates an image, as
QEMU's ``qmp_blockdev_create`` (block/create.c).

The command only checks the driver and creates the job; everything else
happens in the job, so a bad option or a missing node is the job's
``error`` (query-jobs), not the command's: the job goes created ->
running -> waiting -> pending -> concluded (or aborting -> concluded) and,
like QEMU's, waits for ``job-dismiss`` (auto-finalize on, auto-dismiss off).
Progress is 0/1, then 1/1. No ``BLOCK_JOB_*`` events: it is not a block job.

Drivers: ``file`` (QEMU's file-posix: create without truncating, then
truncate to 0 and to ``size`` with ``preallocation`` off, falloc or full)
and ``qcow2`` written into an existing ``file`` node (or one defined
inline), with QEMU's checks in QEMU's order and texts; qcow2 preallocation
``falloc``/``full`` creates the image empty, then grows it as QEMU does
(``formats/qcow2/prealloc.py``: any number of refcount blocks, extended L2
entries too). ``raw`` and other
drivers QEMU cannot create: ``Driver does not support blockdev-create``;
drivers QEMU creates but blkjobs does not: one line saying so.
"""
from __future__ import annotations

import errno
import os
from typing import Any

from ..errors import UsageError
from ..formats.qcow2.create import create as qcow2_create
from ..formats.qcow2.prealloc import preallocate as qcow2_preallocate
from ..jobmodel import Job, JobDriver
from .protocol import QMPError

#: Drivers whose QEMU driver implements bdrv_co_create (QEMU 7.2).
QEMU_CREATABLE = ("file", "gluster", "luks", "nfs", "parallels", "qcow", "qcow2", "qed",
                  "rbd", "ssh", "vdi", "vhdx", "vmdk", "vpc")
_ZEROS = bytes(1 << 20)


def _create_file(opts: dict[str, Any]) -> None:
    path, size = opts["filename"], opts["size"]
    prealloc = opts.get("preallocation", "off")
    if opts.get("extent-size-hint", 0) > 0xFFFFFFFF:
        raise QMPError("Extent size hint is too large")
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise QMPError(f"Could not create '{path}': {e.strerror}") from None
    try:
        os.ftruncate(fd, 0)
        if prealloc == "metadata":
            raise QMPError("Unsupported preallocation mode: metadata")
        try:
            os.ftruncate(fd, size)
        except (OSError, OverflowError) as e:
            why = e.strerror if isinstance(e, OSError) else os.strerror(errno.EINVAL)
            raise QMPError(f"Could not resize file: {why}") from None
        if prealloc == "falloc" and size:
            os.posix_fallocate(fd, 0, size)
        elif prealloc == "full":
            off = 0
            while off < size:
                off += os.pwrite(fd, _ZEROS[:min(len(_ZEROS), size - off)], off)
        os.fsync(fd)
    finally:
        os.close(fd)


def _qcow2_checks(o: dict[str, Any]) -> int:
    """QEMU's qcow2_co_create option checks, in its order; the version."""
    if o["size"] % 512:
        raise QMPError("Image size must be a multiple of 512 bytes")
    version = 2 if o.get("version") == "v2" else 3
    cs = o.get("cluster-size", 65536)
    ext_l2 = o.get("extended-l2", False)
    if ext_l2 and version < 3:
        raise QMPError("Extended L2 entries are only supported with compatibility level 1.1 "
                       "and above (use version=v3 or greater)")
    if cs < 512 or cs > (2 << 20) or cs & (cs - 1):
        raise QMPError("Cluster size must be a power of two between 512 and 2048k")
    if ext_l2 and cs < 16384:
        raise QMPError("Extended L2 entries are only supported with cluster sizes of at "
                       "least 16384 bytes")
    prealloc = o.get("preallocation", "off")
    if "backing-file" in o and prealloc != "off" and not ext_l2:
        raise QMPError("Backing file and preallocation can only be used at the same time "
                       "if extended_l2 is on")
    if "backing-fmt" in o and "backing-file" not in o:
        raise QMPError("Backing format cannot be used without backing file")
    if version < 3 and o.get("lazy-refcounts", False):
        raise QMPError("Lazy refcounts only supported with compatibility level 1.1 and above "
                       "(use version=v3 or greater)")
    rb = o.get("refcount-bits", 16)
    if rb > 64 or rb <= 0 or rb & (rb - 1):
        raise QMPError("Refcount width must be a power of two and may not exceed 64 bits")
    if version < 3 and rb != 16:
        raise QMPError("Different refcount widths than 16 bits require compatibility level "
                       "1.1 or above (use version=v3 or greater)")
    if version < 3 and o.get("compression-type", "zlib") != "zlib":
        raise QMPError("Non-zlib compression type is only supported with compatibility level "
                       "1.1 and above (use version=v3 or greater)")
    return version


class CreateJob(JobDriver):
    job_type = "create"

    def __init__(self, cmds: Any, options: dict[str, Any]):
        self.cmds = cmds
        self.options = options

    def run(self, job: Job) -> None:
        job.progress.update(0, 1)
        o = self.options
        try:
            if o["driver"] == "file":
                _create_file(o)
            else:
                self._qcow2(o)
        finally:        # QEMU counts the step done whatever its result
            job.progress.update(1, 1)

    def _qcow2(self, o: dict[str, Any]) -> None:
        path = self.cmds._create_target(o["file"])
        version = _qcow2_checks(o)
        for key in ("data-file", "data-file-raw", "encrypt"):
            if key in o:
                raise QMPError(f"blkjobs does not support '{key}' for driver 'qcow2'")
        prealloc = o.get("preallocation", "off")
        # falloc, full: created empty, then grown as QEMU grows it
        full = prealloc in ("falloc", "full")
        qcow2_create(path, 0 if full else o["size"], cluster_size=o.get("cluster-size", 65536),
                     extended_l2=o.get("extended-l2", False),
                     backing_file=o.get("backing-file"), backing_format=o.get("backing-fmt"),
                     preallocation="off" if full else prealloc,
                     compat="1.1" if version == 3 else "0.10",
                     refcount_bits=o.get("refcount-bits", 16),
                     lazy_refcounts=o.get("lazy-refcounts", False),
                     compression_type=o.get("compression-type", "zlib"),
                     backing_format_optional=True)
        if full:
            try:
                qcow2_preallocate(path, o["size"], prealloc)
            except UsageError as e:
                raise QMPError(str(e)) from None


class CreateCommands:
    """``blockdev-create`` (mixed into Commands)."""

    eng: Any
    nodes: dict

    def _create_target(self, ref: Any) -> str:
        """The file a qcow2 image is written into: a ``file`` node of the
        monitor, or one defined inline (QEMU opens it for the job)."""
        if isinstance(ref, str):
            mn = self.nodes.get(ref)
            if mn is None:
                raise QMPError(f"Cannot find device='{ref}' nor node-name='{ref}'")
            if mn.drv != "file":
                raise QMPError(f"blkjobs creates a qcow2 image only in a 'file' node, not in "
                               f"'{ref}' ({mn.drv})")
            if mn.read_only:
                raise QMPError("Block node is read-only")
            return mn.filename
        if ref["driver"] != "file":
            raise QMPError(f"blkjobs creates a qcow2 image only in a 'file' node, not in "
                           f"'{ref['driver']}'")
        path = ref["filename"]
        try:
            os.close(os.open(path, os.O_RDWR))
        except OSError as e:
            raise QMPError(f"Could not open '{path}': {e.strerror}") from None
        return path

    def cmd_blockdev_create(self, options: dict[str, Any], **args: Any) -> dict[str, Any]:
        drv = options["driver"]
        if drv not in ("file", "qcow2"):
            if drv in QEMU_CREATABLE:
                raise QMPError(f"blkjobs does not create '{drv}' images "
                               "(supported: file, qcow2)")
            raise QMPError("Driver does not support blockdev-create")
        job = self.eng.jobs.create(CreateJob(self, options), args["job-id"],
                                   auto_finalize=True, auto_dismiss=False)
        self.eng.jobs.start(job)
        return {}
