"""The scratch directory of a ``blkjobs bench`` run (:class:`Workspace`), the
page cache between runs (:class:`CacheControl`) and the files the
contenders share (:class:`Env`: the data file, the source image and the
targets, laid out once)."""
from __future__ import annotations

import errno
import mmap
import os
import random
import shutil
import tempfile
from dataclasses import dataclass, field
from collections.abc import Callable

from ..errors import UsageError
from ..native.ioloop import IOLoop
from .matrix import Density
from .measure import Clock
from .sizes import format_bytes


# -- the scratch directory ---------------------------------------------------
class Workspace:
    """A private directory under ``base`` holding every file the benchmark
    makes; :meth:`cleanup` removes it (unless ``keep``)."""

    def __init__(self, base: str, keep: bool = False):
        self.base = base
        self.keep = keep
        if not os.path.exists(base):
            raise UsageError(f"bench directory '{base}' does not exist")
        if not os.path.isdir(base):
            raise UsageError(f"'{base}' is not a directory")
        try:
            self.path = tempfile.mkdtemp(prefix="blkjobs-bench.", dir=base)
        except OSError as e:
            if e.errno == errno.EROFS:
                raise UsageError(f"cannot write in '{base}': read-only file system") from None
            if e.errno in (errno.EACCES, errno.EPERM):
                raise UsageError(f"cannot write in '{base}': permission denied") from None
            raise

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)

    def check_space(self, need: int) -> None:
        st = os.statvfs(self.path)
        have = st.f_bavail * st.f_frsize
        if have < need:
            raise UsageError(f"not enough free space in '{self.base}': the benchmark needs "
                             f"{format_bytes(need)}, {format_bytes(have)} available "
                             f"(use a smaller --size)")

    def probe_direct(self) -> None:
        """Fail with a clear message when the file system refuses O_DIRECT
        (open or an aligned write answers EINVAL)."""
        why = self.direct_refused()
        if why:
            raise UsageError(
                f"the file system of '{self.base}' refuses O_DIRECT ({why}): run "
                f"without --direct, or benchmark a directory on a local disk "
                f"(tmpfs before Linux 6.6 and some FUSE/network file systems refuse it)")

    def direct_refused(self) -> str | None:
        """None when the file system takes O_DIRECT (an open and an aligned
        write), else why not (the strerror of EINVAL or EOPNOTSUPP)."""
        p = self.file("direct-probe")
        buf = mmap.mmap(-1, 4096)  # page aligned
        try:
            fd = os.open(p, os.O_CREAT | os.O_RDWR | os.O_DIRECT, 0o600)
            try:
                os.pwrite(fd, buf, 0)
            finally:
                os.close(fd)
        except OSError as e:
            if e.errno in (errno.EINVAL, errno.EOPNOTSUPP):
                return e.strerror or os.strerror(e.errno)
            raise
        finally:
            buf.close()
            try:
                os.unlink(p)
            except FileNotFoundError:
                pass
        return None

    def cleanup(self) -> None:
        if not self.keep:
            shutil.rmtree(self.path, ignore_errors=True)


PAGE_CACHE = "page-cache"


# -- caches --------------------------------------------------------------------
class CacheControl:
    """Makes runs cold when asked. As root, ``sync`` then writing 3 to
    /proc/sys/vm/drop_caches empties the page cache, dentries and inodes of
    the whole machine. Otherwise (or when /proc/sys is read-only, as in many
    containers) posix_fadvise(POSIX_FADV_DONTNEED) drops the clean pages of
    the benchmark's own files, which is what a cold read needs; metadata
    stays cached. O_DIRECT runs bypass the cache either way."""

    DROP = "/proc/sys/vm/drop_caches"

    def __init__(self, cold: bool):
        self.cold = cold
        self.method = None
        if cold:
            self.method = "drop_caches" if self._try_drop() else "fadvise"

    def _try_drop(self) -> bool:
        if os.geteuid() != 0:
            return False
        try:
            os.sync()
            with open(self.DROP, "w") as f:
                f.write("3\n")
            return True
        except OSError:
            return False

    def label(self, direct: bool) -> str:
        """'bypassed' (O_DIRECT), 'cold:METHOD' (pages evicted before the
        run) or 'page-cache': a buffered run on a warm cache, whose figure
        is what the page cache absorbed or served, not the disk's."""
        if direct:
            return "bypassed"
        return f"cold:{self.method}" if self.cold else PAGE_CACHE

    def note(self) -> str | None:
        if not self.cold:
            return None
        if self.method == "drop_caches":
            return "cold runs: page cache dropped (sync; echo 3 > /proc/sys/vm/drop_caches) " \
                   "before every run"
        return ("cold runs: cannot drop the system's caches (needs root and a writable "
                "/proc/sys); the benchmark files' pages are evicted with "
                "posix_fadvise(DONTNEED) before every run instead, metadata stays cached; "
                "O_DIRECT (--direct) bypasses the cache altogether")

    def before_run(self, paths: list[str]) -> None:
        if not self.cold:
            return
        if self.method == "drop_caches" and self._try_drop():
            return
        for p in paths:
            try:
                fd = os.open(p, os.O_RDONLY)
            except FileNotFoundError:
                continue
            try:
                os.fdatasync(fd)  # dirty pages cannot be dropped
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)



# -- the shared files ----------------------------------------------------------
@dataclass
class Env:
    """What contenders share: the workspace, the settings and the files."""
    ws: Workspace
    size: int
    runtime: float
    density: Density
    cache: CacheControl
    clock: Clock
    seed: int = 1
    progress: Callable[[str], None] = lambda text: None
    _laid_out: set = field(default_factory=set)

    @property
    def data_file(self) -> str:
        return self.ws.file("data.dat")

    @property
    def src_image(self) -> str:
        return self.ws.file("source.img")

    def dst_image(self, tool: str) -> str:
        return self.ws.file(f"target-{tool}.img")

    def layout_data(self) -> None:
        """Write the file the read/write workloads use, once, fully (like
        fio's layout): reads then hit allocated blocks, writes overwrite."""
        if "data" in self._laid_out:
            return
        self.progress(f"laying out {format_bytes(self.size)} test file")
        fd = os.open(self.data_file, os.O_CREAT | os.O_RDWR | os.O_TRUNC, 0o600)
        try:
            bs = min(self.size, 1 << 20) // 512 * 512
            with IOLoop(fd, write=True, random=False, bs=bs, size=self.size, threads=1,
                        fsync=True, seed=self.seed, path=self.data_file) as loop:
                loop.run()
            # a size that is not a multiple of bs: the tail too
            os.ftruncate(fd, self.size)
        finally:
            os.close(fd)
        self._laid_out.add("data")

    def layout_image(self) -> None:
        """A VM-shaped raw image: extents of 64 KiB .. 4 MiB, each data
        (random bytes), written zeroes or a hole, by the density shares."""
        if "image" in self._laid_out:
            return
        self.progress(f"laying out {format_bytes(self.size)} source image ({self.density})")
        rng = random.Random(self.seed)
        d = self.density
        fd = os.open(self.src_image, os.O_CREAT | os.O_RDWR | os.O_TRUNC, 0o600)
        try:
            os.ftruncate(fd, self.size)
            pos = 0
            zeros = bytes(1 << 20)
            while pos < self.size:
                n = min(rng.choice((64 << 10, 256 << 10, 1 << 20, 4 << 20)), self.size - pos)
                pick = rng.uniform(0, 100)
                kind = "data" if pick < d.data else "zero" if pick < d.data + d.zero else "hole"
                if kind == "hole" or n == 0:
                    pos += n
                    continue
                end = pos + n
                while pos < end:
                    m = min(1 << 20, end - pos)
                    os.pwrite(fd, rng.randbytes(m) if kind == "data" else zeros[:m], pos)
                    pos += m
            os.fsync(fd)
        finally:
            os.close(fd)
        self._laid_out.add("image")

