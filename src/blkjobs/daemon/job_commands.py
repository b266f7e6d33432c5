"""Block jobs over QMP: ``blockdev-backup``, ``blockdev-mirror``,
``block-stream``, ``block-commit``, the queries and the ``job-*`` and
``block-job-*`` verbs, mapped onto the :class:`~blkjobs.engine.Engine`
(argument translation: QMP names -> the Engine's keyword names).

Mixed into :class:`~.commands.Commands`; the node lookups are
:class:`~.node_commands.NodeCommands`'.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..graph import Node
from ..jobmodel import JobTxn
from .protocol import QMPError


def _kw(args: dict[str, Any], drop: tuple[str, ...] = ()) -> dict[str, Any]:
    """QMP argument names -> the Engine's keyword names."""
    return {k.replace("-", "_"): v for k, v in args.items() if k not in drop}


class JobCommands:
    """The job commands (mixed into Commands)."""

    eng: Any
    # from NodeCommands
    _lookup: Callable[[str], Node]
    _check_job_blockers: Callable[..., None]
    _note_backend: Callable[[Any], None]        # GraphCommands

    def _job_id(self, args: dict[str, Any]) -> str:
        # No BlockBackends here, so QEMU's default (the device name) is "".
        return args.pop("job-id", "")

    def _start_backup(self, args: dict[str, Any], txn: JobTxn | None = None):
        args = dict(args)
        src, dst = self._lookup(args.pop("device")), self._lookup(args.pop("target"))
        with self.eng.io:
            self._check_job_blockers(src, dst)
        job_id = self._job_id(args)
        kw = _kw(args, drop=("x-perf", "discard-source"))
        if args.get("discard-source"):
            raise QMPError("blkjobs does not support 'discard-source'")
        job = self.eng.backup(src, dst, kw.pop("sync"), job_id=job_id, txn=txn,
                              start=txn is None, **kw)
        self._note_backend(job)      # when its filter went in (x-debug-query-block-graph)
        return job

    def cmd_blockdev_backup(self, **args: Any) -> dict[str, Any]:
        self._start_backup(args)
        return {}

    def cmd_blockdev_mirror(self, **args: Any) -> dict[str, Any]:
        src, dst = self._lookup(args.pop("device")), self._lookup(args.pop("target"))
        with self.eng.io:
            # QEMU's qmp_get_root_bs: no node parent at all, a job's filter
            # included; then the op blockers of the source and the target
            if self.eng.graph.parents(src):
                raise QMPError("Need a root block node")
            self._check_job_blockers(src, dst)
        job_id = self._job_id(args)
        kw = _kw(args)
        job = self.eng.mirror(src, dst, kw.pop("sync"), job_id=job_id, **kw)
        self._note_backend(job)         # its target's BlockBackend, its filter
        return {}

    def cmd_block_stream(self, **args: Any) -> dict[str, Any]:
        top = self._lookup(args.pop("device"))
        job_id = self._job_id(args)
        job = self.eng.stream(top, job_id=job_id,
                              **_kw(args, drop=("backing-mask-protocol",)))
        self._note_backend(job)         # its BlockBackend (on its filter)
        return {}

    def cmd_block_commit(self, **args: Any) -> dict[str, Any]:
        dev = args.pop("device")
        if dev not in self.eng.graph.nodes:
            raise QMPError(f"Device '{dev}' not found", "DeviceNotFound")
        job_id = self._job_id(args)
        job = self.eng.commit(self.eng.graph.nodes[dev], job_id=job_id,
                              **_kw(args, drop=("backing-mask-protocol",)))
        self._note_backend(job)         # its BlockBackends (base, top)
        return {}

    def cmd_query_jobs(self) -> list[dict[str, Any]]:
        return self.eng.query_jobs()

    def cmd_query_block_jobs(self) -> list[dict[str, Any]]:
        return self.eng.query_block_jobs()

    def _verb(self, fn: Callable, *a: Any) -> dict[str, Any]:
        fn(*a)
        return {}

    def cmd_job_pause(self, id: str):
        return self._verb(self.eng.jobs.job_pause, id)

    def cmd_job_resume(self, id: str):
        return self._verb(self.eng.jobs.job_resume, id)

    def cmd_job_cancel(self, id: str):
        return self._verb(self.eng.jobs.job_cancel, id)

    def cmd_job_complete(self, id: str):
        return self._verb(self.eng.jobs.job_complete, id)

    def cmd_job_finalize(self, id: str):
        return self._verb(self.eng.jobs.job_finalize, id)

    def cmd_job_dismiss(self, id: str):
        return self._verb(self.eng.jobs.job_dismiss, id)

    def cmd_block_job_set_speed(self, device: str, speed: int):
        return self._verb(self.eng.jobs.block_job_set_speed, device, speed)

    def cmd_block_job_cancel(self, device: str, force: bool = False):
        return self._verb(self.eng.jobs.block_job_cancel, device, force)

    def cmd_block_job_pause(self, device: str):
        return self._verb(self.eng.jobs.block_job_pause, device)

    def cmd_block_job_resume(self, device: str):
        return self._verb(self.eng.jobs.block_job_resume, device)

    def cmd_block_job_complete(self, device: str):
        return self._verb(self.eng.jobs.block_job_complete, device)

    def cmd_block_job_finalize(self, id: str):
        return self._verb(self.eng.jobs.block_job_finalize, id)

    def cmd_block_job_dismiss(self, id: str):
        return self._verb(self.eng.jobs.block_job_dismiss, id)

    def cmd_block_job_change(self, id: str, type: str, **options: Any):
        job = self.eng.jobs.find_block_job(id)
        if job.type != type:
            raise QMPError("Job type does not match")
        if job.type != "mirror":
            raise QMPError("Job type does not support change")
        self.eng.jobs.block_job_change(id, type, **options)
        return {}
