"""The declared contracts callers use instead of probing: the Driver of
formats/base.py and the BlockJob of jobs/base.py. A driver that declares
nothing gets the neutral answers; the blkdebug wrapper forwards what its
driver declares; a filter node's driver answers what callers ask any node."""
from __future__ import annotations

from blkjobs.formats.base import Driver, Kind, Mapping
from blkjobs.graph.filter import FilterDriver
from blkjobs.jobs.base import BlockJob
from blkjobs.jobs.blkdebug import Blkdebug
from blkjobs.jobs.commit import ActiveCommitJob, CommitJob
from blkjobs.jobs.mirror import MirrorJob


class Bare(Driver):
    """A driver that declares none of the optional parts of the contract."""

    format_name = "bare"
    filename = "bare.img"
    read_only = True

    @property
    def fd(self) -> int:
        return -1

    @property
    def size(self) -> int:
        return 1 << 20

    def map_host(self, offset, length):
        return [Mapping(offset, length, Kind.UNALLOCATED)]

    def readinto(self, offset, buf):
        buf[:] = bytes(len(buf))

    def write(self, offset, data, fill=None):
        raise AssertionError("not written")

    write_zeroes = discard = write

    def flush(self):
        pass

    def close(self):
        pass


def test_a_driver_that_declares_nothing_gets_the_neutral_answers():
    d = Bare()
    assert d.map_for_read(0, 4096) is None
    assert d.read_segments([(0, 4096)], True) is None
    assert d.file_length is None
    assert (d.data_path, d.read_zeroes, d.disk_size_unknown) == (None, True, False)
    assert (d.bitmaps, d.bitmaps_loaded, d.persistent_bitmaps) == (None, False, None)
    assert (d.has_debug_hook, d.blkdebug, d.header, d.ctype) == (False, None, None, 0)
    assert (d.spec_name, d.map_filename, d.backing_spec, d.backing_ref) == (None, None, "", None)
    assert (d.no_backing, d.no_dirname, d.quorum_disk_size) == (False, False, None)
    grew: list[int] = []
    d.watch_file_growth(grew.append)
    d.backing_read(0, 4096)
    d.activate_bitmaps()
    d.reopen_bitmaps_ro()
    assert grew == []


def test_the_blkdebug_wrapper_forwards_what_its_driver_declares():
    class Declares(Bare):
        data_path = "data.img"
        has_debug_hook = True

        def map_for_read(self, offset, length):
            return [[offset, length, int(Kind.ZERO), None]]

    w = Blkdebug(Declares(), [])
    assert (w.data_path, w.has_debug_hook, w.spec_name) == ("data.img", True, None)
    assert w.map_for_read(0, 512) == [[0, 512, int(Kind.ZERO), None]]
    assert w.injects_faults is True


class _Child:
    filename, size, read_only = "child.img", 1 << 20, True


def test_a_filter_nodes_driver_answers_what_callers_ask_any_node():
    f = FilterDriver("copy-before-write", _Child())
    assert (f.spec_name, f.injects_faults, f.backing_filename) == (None, False, None)
    grew: list[int] = []
    f.watch_file_growth(grew.append)
    f.activate_bitmaps()
    f.reopen_bitmaps_ro()
    assert grew == []


class BareJob(BlockJob):
    def setup(self, job):
        pass

    def run(self, job):
        return None


def test_a_block_job_that_declares_nothing_gets_the_neutral_answers():
    j = BareJob(None)       # no I/O: only the declarations
    assert (j.src, j.dst, j.fnode, j.mover, j.copy_bm, j.bm) == (None,) * 6
    assert j.mirrors_into_base is False
    assert j.bytes_progress() is None
    assert j.throttled(None) is False


def test_only_an_active_commit_mirrors_into_base():
    assert ActiveCommitJob.mirrors_into_base is True
    assert (CommitJob.mirrors_into_base, MirrorJob.mirrors_into_base) == (False, False)
