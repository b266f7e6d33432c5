"""blkjobs backup [-f FMT] [-O FMT] [--sync MODE] [--bitmap NAME [--bitmap-mode M]]
[-B BACKING] [--speed RATE] [--compress] [--on-source-error P] [--on-target-error P]
[--job-id ID] [-p] [--events] SRC TARGET

Runs a backup job (``blockdev-backup``) from SRC into TARGET (created with
SRC's size when missing: ``-O`` format, default qcow2; for ``--sync top`` it
gets SRC's backing file, with ``-B`` the given one). Incremental backup
(docs/bitmaps.md): ``--sync full --bitmap NAME`` copies everything and
creates the persistent bitmap NAME in SRC (or clears it) at the point in
time of the copy; ``--sync incremental --bitmap NAME -B PREV`` copies only
what NAME marks, into a qcow2 overlay of the previous backup PREV, and
hands the bitmap over (bitmap-mode on-success; ``--sync bitmap`` takes
``--bitmap-mode``). Also holds what the four job commands share:
option registration, running a job to its end with a progress line or QMP
JSON-line events, and exit codes: 0 completed, 1 failed (or bad usage),
2 cancelled, 130 interrupted (Ctrl-C), 143 terminated (SIGTERM). When a job
does not complete, its one line also says what it left in the files.
"""
from __future__ import annotations

import errno
import os
import signal
import sys

from ..errors import BlkjobsError, JobError, Terminated, raise_pending_stop, take_stop
from ..jobmodel import JsonLinesWriter
from . import xbreak
from .copy_progress import Reporter, add_progress_options
from ..units import human, parse_size
from . import progname

POLICIES = ["report", "ignore", "stop", "enospc", "auto"]


class JobFailed(BlkjobsError):
    """The job did not complete: it failed (exit 1), was cancelled (2), or
    the command was interrupted (130) or terminated (143)."""

    exit_code = 1

    def __init__(self, msg: str, exit_code: int = 1):
        super().__init__(msg)
        self.exit_code = exit_code


def add_common(p) -> None:
    p.add_argument("--job-id", default="job0", help="job id in events (default job0)")
    p.add_argument("--speed", default="0", metavar="RATE",
                   help="rate limit in bytes per second (e.g. 100M; 0 = unlimited)")
    add_progress_options(p, "the job")
    p.add_argument("--events", action="store_true",
                   help="print QMP-shaped events as JSON lines on stdout, with JOB_PROGRESS "
                   "events (id, current-progress, total-progress) as the job advances")


def cli_engine():
    """The Engine of a job command. Its images hold QEMU's lock bytes as a
    qemu-img command's do: nothing outside this process may write any of
    them while the job runs (the sources, backing files and bases are read
    for a stable view; the targets, the streamed image and the base of a
    commit are written exclusively)."""
    from ..engine import Engine
    eng = Engine()
    eng.graph.share_writes = False
    eng.graph.format_locks = True
    return eng


def open_image_node(eng, path, fmt, **kw):
    """``eng.open`` with qemu-img's text for a lock conflict (``Could not open
    'PATH': Failed to get "write" lock ...``)."""
    from ..errors import ImageError
    from ..formats.sniff import is_spec
    from ..graph.lock import opening
    try:
        with opening(path):
            return eng.open(path, fmt, **kw)
    except ImageError as e:     # json:, file:...: qemu-img names the image first
        if not is_spec(path) or str(e).startswith(f"Could not open '{path}'"):
            raise
        raise ImageError(f"Could not open '{path}': {e}") from None


def refuse_same_file(src: str, target: str) -> None:
    """A job copying an image onto itself (or a link to it): refused as
    convert refuses it, before anything is opened."""
    from ..errors import UsageError
    from ..imageops.files import same_file
    if same_file(src, target):
        raise UsageError(f"source and target are the same file: '{src}'")


def find_base(top, image: str, base: str):
    """The node of ``top``'s backing chain (below top) that ``-b BASE``
    names (relative to IMAGE's directory, as qemu-img resolves it)."""
    from ..errors import UsageError
    from ..graph import resolve_backing
    want = resolve_backing(os.path.abspath(image), base)
    found = None
    for n in top.chain()[1:]:
        if os.path.exists(want) and os.path.samefile(n.filename, want):
            found = n
    if found is None:
        raise UsageError(f"Can't find '{base}' in the backing chain")
    return found


def copied(job, verb: str = "copied") -> str:
    """'12.5 MiB of 64 MiB copied', for the lines below: the bytes really in
    the target -- the job's progress (batches that landed) and what a batch
    that failed or was cancelled wrote before it stopped."""
    # a backup's progress is in whole clusters, as QEMU's: its bytes instead
    by_bytes = job.driver.bytes_progress()
    cur, total = by_bytes if by_bytes is not None else job.progress.snapshot()
    mover = job.driver.mover
    cur += mover.stray_written if mover is not None else 0
    return f"{human(min(cur, total) if total else cur)} of {human(total)} {verb}"


def copy_aftermath(path: str, created: bool):
    """What a backup or mirror that did not complete left: the source is only
    read; the target holds what was copied so far."""
    def say(job, synced: bool) -> str:
        if synced:      # a mirror that reached READY (nothing else writes here)
            return f"the target '{path}' holds a complete copy; the source is unchanged"
        if created:
            return (f"the target '{path}' is incomplete ({copied(job)}); "
                    "the source is unchanged")
        return (f"the target '{path}' was partly overwritten ({copied(job)}) and is not "
                "a complete copy; the source is unchanged")
    return say


def run_job(eng, start, args, ready_action=None, aftermath=None) -> None:
    """Start a job with ``start()`` and drive it to its end. ``ready_action``:
    called (with the job) when it becomes ready (mirror/active commit).
    ``aftermath(job, synced)``: what a job that did not complete left in the
    files (``synced``: it had reached READY), appended to the error line."""
    if args.events:
        eng.add_listener(JsonLinesWriter(sys.stdout))
    prog = Reporter(args, label=args.job_id, quiet=getattr(args, "quiet", False))
    xbreak.arm(eng)
    try:
        _drive(eng, start, args, prog, ready_action, aftermath)
    finally:
        prog.close()


def _progress_event(job, cur: int, total: int) -> None:
    """A JOB_PROGRESS line among --events' (the fields of query-jobs)."""
    import json
    import time
    now = time.time()
    sys.stdout.write(json.dumps({
        "event": "JOB_PROGRESS", "data": {"id": job.id, "current-progress": cur,
                                          "total-progress": total},
        "timestamp": {"seconds": int(now), "microseconds": int(now % 1 * 1e6)}}) + "\n")
    sys.stdout.flush()


def _drive(eng, start, args, prog, ready_action, aftermath) -> None:
    job = start()
    seen = (-1, -1)
    synced = False
    # A job stopped by its error policy (stop, enospc, auto) waits for the
    # user: one line says so, and SIGCONT (`kill -CONT PID`) resumes it.
    stopped_on: list[str] = []      # operation of the last stopping error
    eng.add_listener(lambda ev: stopped_on.append(ev.data["operation"])
                     if ev.name == "BLOCK_JOB_ERROR" and ev.data.get("device") == job.id
                     and ev.data.get("action") == "stop" else None)
    resume = _ResumeOnSigcont()
    announced = False
    try:
        while job.outcome is None:
            try:
                # (called before the loop goes on: `synced` is this turn's)
                eng.jobs.wait_until(lambda: job.outcome is not None or
                                    (job.is_ready and not synced)  # noqa: B023
                                    or resume.requested, 0.2)
            except TimeoutError:
                pass
            raise_pending_stop()        # a Ctrl-C that a finalizer dropped
            cur, total = job.progress.snapshot()
            prog.update(cur, total)
            if args.events and (cur, total) != seen and job.outcome is None:
                seen = (cur, total)
                _progress_event(job, cur, total)
            if job.is_ready and not synced:
                synced = True
                if ready_action:
                    ready_action(job)
            error_paused = job.status.value == "paused" and job.io_status.value != "ok"
            if resume.take() and error_paused:
                try:
                    eng.jobs.user_resume(job)
                except JobError:
                    pass
                announced = False
            elif error_paused and not announced:
                announced = True
                if args.progress and sys.stdout.isatty():
                    sys.stdout.write("\n")     # ends the live line
                sys.stderr.write(f"{progname()}: {_paused_line(job, args, stopped_on)}\n")
                sys.stderr.flush()
    except KeyboardInterrupt as e:
        # Cancel and wait, so the job's last writes and flush happen before
        # we say what is in the files (a second Ctrl-C gives up waiting).
        take_stop()
        prog.finish()
        try:
            eng.jobs.cancel_job(job, True)
        except JobError:        # it ended first: say so below
            pass
        xbreak.let_go(eng)
        eng.wait_job(job, 30)
        how, code = ("terminated", 143) if isinstance(e, Terminated) else ("interrupted", 130)
        if job.outcome.value == "completed":
            raise JobFailed(f"{how} after the {job.type} job completed", code) from None
        raise JobFailed(f"{how}: {job.type} job cancelled{_left(aftermath, job, synced)}",
                        code) from None
    finally:
        resume.restore()
    cur, total = job.progress.snapshot()
    prog.update(cur, total)
    prog.finish()
    if job.outcome.value == "failed":
        raise JobFailed(f"{job.type} job failed: {job.error}{_left(aftermath, job, synced)}", 1)
    if job.outcome.value == "cancelled":
        raise JobFailed(f"{job.type} job cancelled{_left(aftermath, job, synced)}", 2)


class _ResumeOnSigcont:
    """SIGCONT sets a flag the job loop takes (the handler does nothing
    else); the previous handler is put back by :meth:`restore`."""

    def __init__(self) -> None:
        self.requested = False
        try:
            self._old = signal.signal(signal.SIGCONT, self._on)
        except ValueError:          # not the main thread: no resume by signal
            self._old = None

    def _on(self, signum, frame) -> None:
        self.requested = True

    def take(self) -> bool:
        r, self.requested = self.requested, False
        return r

    def restore(self) -> None:
        if self._old is not None:
            signal.signal(signal.SIGCONT, self._old)
            self._old = None


def _paused_line(job, args, stopped_on: list[str]) -> str:
    """'backup job paused: No space left on device writing 'bk.qcow2'; ...'"""
    why = (os.strerror(errno.ENOSPC) if job.io_status.value == "nospace"
           else "I/O error")
    op = stopped_on[-1] if stopped_on else "write"
    path = getattr(args, "target" if op == "write" else "src", None)
    where = f"{'writing' if op == 'write' else 'reading'}" + (f" '{path}'" if path else "")
    pid = os.getpid()
    fix = "free space" if job.io_status.value == "nospace" else "fix the cause"
    return (f"{job.type} job paused: {why} {where}; {fix}, then 'kill -CONT {pid}' "
            f"retries (Ctrl-C or 'kill {pid}' cancels the job)")


def _left(aftermath, job, synced: bool) -> str:
    return f"; {aftermath(job, synced)}" if aftermath else ""


def register(sub):
    p = sub.add_parser("backup", help="point-in-time copy of an image into another one",
                       description="Copy SRC into TARGET as a backup job would (blockdev-backup).")
    p.add_argument("-f", dest="src_fmt", metavar="FMT", help="source format (probed)")
    p.add_argument("-O", dest="dst_fmt", metavar="FMT",
                   help="target format (probed if TARGET exists, else qcow2)")
    p.add_argument("--sync", default="full",
                   choices=["full", "top", "none", "incremental", "bitmap"])
    p.add_argument("--bitmap", metavar="NAME",
                   help="persistent dirty bitmap of SRC: created (or cleared) by a full "
                   "backup, used by an incremental one")
    p.add_argument("--bitmap-mode", choices=["on-success", "always", "never"],
                   help="what the bitmap becomes after the job (default on-success)")
    p.add_argument("-B", dest="backing", metavar="BACKING",
                   help="backing file of a created qcow2 TARGET (the previous backup)")
    p.add_argument("--compress", action="store_true", help="compressed clusters (qcow2 target)")
    p.add_argument("-t", dest="cache", default="writeback", choices=["writeback", "unsafe"],
                   help="target cache mode: writeback flushes at the end, unsafe does not "
                   "(qemu-img convert's default)")
    p.add_argument("--on-source-error", default="report", choices=POLICIES)
    p.add_argument("--on-target-error", default="report", choices=POLICIES)
    add_common(p)
    p.add_argument("src")
    p.add_argument("target")
    p.set_defaults(func=run)


def open_target(eng, src_node, path, fmt, backing=None, cache="writeback"):
    """TARGET opened, or created with SRC's size (``created`` tells which).
    An NBD URI names an existing export: opened, never created."""
    if target_exists(path):
        return open_image_node(eng, path, fmt, node_name="target", cache=cache)
    fmt = fmt or "qcow2"
    opts = {}
    if backing is not None and fmt == "qcow2":
        opts = {"backing_file": os.path.abspath(backing.filename),
                "backing_format": backing.format}
    return eng.create(path, fmt, src_node.size, node_name="target", cache=cache, **opts)


def _check_bitmap_args(args) -> None:
    from ..errors import UsageError
    if args.sync in ("incremental", "bitmap") and not args.bitmap:
        raise UsageError(f"--sync {args.sync} needs --bitmap NAME")
    if args.bitmap and args.sync not in ("full", "incremental", "bitmap"):
        raise UsageError(f"--bitmap goes with --sync full, incremental or bitmap, "
                         f"not {args.sync}")
    if args.bitmap_mode and not args.bitmap:
        raise UsageError("--bitmap-mode needs --bitmap NAME")
    if args.sync == "incremental" and args.bitmap_mode not in (None, "on-success"):
        raise UsageError("--sync incremental hands the bitmap over on success only "
                         "(use --sync bitmap for other bitmap modes)")
    if args.sync in ("incremental", "bitmap") and not args.backing \
            and not os.path.exists(args.target):
        raise UsageError(f"--sync {args.sync} writes an overlay of the previous backup: "
                         "give it with -B BACKING")


def _source_bitmap(eng, src, args) -> tuple[str | None, bool]:
    """The bitmap mode of the job and whether the bitmap was created here.
    A full backup with ``--bitmap`` hands NAME over as the job starts: a new
    one is added (persistent), an existing one is frozen with the copy and
    becomes, on success, what was written since (QEMU's sync=full with
    bitmap-mode=on-success: no write between the copy and the hand-over is
    lost)."""
    from ..errors import JobError
    if not args.bitmap:
        return None, False
    mode = args.bitmap_mode or "on-success"
    with eng.io:
        exists = args.bitmap in eng.io.bitmaps_of(src)
    if exists or args.sync != "full":
        bm = eng.bitmap(src, args.bitmap)       # "Bitmap 'x' could not be found"
        if bm.inconsistent:
            raise JobError(f"Bitmap '{args.bitmap}' is inconsistent and cannot be used "
                           f"(a crash left it in use): remove it with 'blkjobs bitmap "
                           f"--remove {args.src} {args.bitmap}' and take a full backup")
        return mode, False
    gran = min(max(src.driver.cluster_size or 65536, 4096), 65536)
    eng.block_dirty_bitmap_add(src, args.bitmap, gran, persistent=True)
    return mode, True


def _create_overlay(eng, src, args):
    """TARGET created as a qcow2 overlay of ``-B BACKING`` (the previous
    backup), named relative to TARGET's directory so that the chain can be
    moved as a whole."""
    from ..errors import UsageError
    if (args.dst_fmt or "qcow2") != "qcow2":
        raise UsageError("-B needs a qcow2 TARGET")
    if not os.path.exists(args.backing):
        raise UsageError(f"Could not open backing file '{args.backing}': "
                         "No such file or directory")
    rel = os.path.relpath(os.path.abspath(args.backing),
                          os.path.dirname(os.path.abspath(args.target)))
    return eng.create(args.target, "qcow2", src.size, node_name="target", cache=args.cache,
                      backing_file=rel)


def target_exists(path: str) -> bool:
    """A file, or an NBD export (always there: never created)."""
    from ..formats.nbd import is_nbd_uri
    return is_nbd_uri(path) or os.path.exists(path)


def run(args) -> int:
    refuse_same_file(args.src, args.target)
    _check_bitmap_args(args)
    eng = cli_engine()
    try:
        # a bitmap is changed by the job: the source is then opened read-write
        src = open_image_node(eng, args.src, args.src_fmt, node_name="source",
                              read_only=not args.bitmap)
        created = not target_exists(args.target)
        speed = parse_size(args.speed, "speed")
        mode, new_bitmap = _source_bitmap(eng, src, args)
        try:
            if args.backing and created:
                tgt = _create_overlay(eng, src, args)
            else:
                tgt = open_target(eng, src, args.target, args.dst_fmt,
                                  src.backing if args.sync == "top" else None, args.cache)
            run_job(eng, lambda: eng.backup(src, tgt, args.sync, job_id=args.job_id,
                                            speed=speed, compress=args.compress,
                                            bitmap=args.bitmap, bitmap_mode=mode,
                                            on_source_error=args.on_source_error,
                                            on_target_error=args.on_target_error), args,
                    aftermath=copy_aftermath(args.target, created))
        except BaseException:
            if new_bitmap:      # no full backup it could follow: not kept
                eng.block_dirty_bitmap_remove(src, args.bitmap)
            raise
    finally:
        eng.close()
    return 0
