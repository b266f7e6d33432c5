"""How the jobs hand work to the copy engine: an incremental backup's
scattered dirty clusters travel in one batch (not one engine round trip per
cluster), each changed cluster lands in a target cluster allocated for it
(the whole-cluster fast path), the last, partial cluster of an image too.
qemu-img (map, compare, check) is the oracle."""
from __future__ import annotations

import itertools
import random

from blkjobs.jobs.blockcopy import Mover
from qemu_oracle import check_clean, qemu_img, qemu_io, qemu_map
from test_jobs_helpers import eng  # noqa: F401

K64 = 65536
SIZE = 64 * (1 << 20) + 32 * 1024       # the last cluster is half a cluster


def _counting(monkeypatch) -> list[int]:
    calls: list[int] = []
    orig = Mover.start_areas

    def start_areas(self, areas):
        calls.append(len(areas))
        return orig(self, areas)
    monkeypatch.setattr(Mover, "start_areas", start_areas)
    return calls


def test_incremental_backup_moves_scattered_clusters_in_one_batch(eng, tmp_path,
                                                                  monkeypatch):
    disk, full, inc = tmp_path / "disk.qcow2", tmp_path / "full.qcow2", tmp_path / "inc.qcow2"
    qemu_img("create", "-f", "qcow2", disk, SIZE)
    qemu_io(disk, "write -P 1 0 4M", "write -P 2 20M 2M")
    qemu_img("convert", "-O", "qcow2", disk, full)
    qemu_img("bitmap", "--add", disk, "b0")
    nclusters = -(-SIZE // K64)
    changed = sorted(random.Random(5).sample(range(nclusters - 1), 250)) + [nclusters - 1]
    qemu_io(disk, *[f"write -P {3 + i % 200} {c * K64} {min(K64, SIZE - c * K64)}"
                    for i, c in enumerate(changed)])
    qemu_img("create", "-f", "qcow2", "-b", full, "-F", "qcow2", inc, SIZE)
    eng.open(str(disk), "qcow2", node_name="src")
    eng.open(str(inc), "qcow2", node_name="dst")
    calls = _counting(monkeypatch)
    job = eng.backup("src", "dst", sync="bitmap", bitmap="b0", bitmap_mode="never",
                     job_id="inc")
    assert eng.wait_job(job, 60).value == "completed"
    eng.close()
    runs = [(r["start"], r["length"]) for r in qemu_map(inc) if r["depth"] == 0 and r["data"]]
    want: list[tuple[int, int]] = []
    for c in changed:
        n = min(K64, SIZE - c * K64)
        if want and want[-1][0] + want[-1][1] == c * K64:
            want[-1] = (want[-1][0], want[-1][1] + n)
        else:
            want.append((c * K64, n))
    assert runs == want
    assert calls == [len(want)]         # every dirty area in one batch
    assert len(want) > 150
    assert qemu_img("compare", disk, inc).returncode == 0
    check_clean(inc)
    check_clean(disk)


def test_incremental_backup_allocates_the_changed_clusters_together(eng, tmp_path,
                                                                   monkeypatch):
    """The target clusters of scattered changed clusters are allocated a
    few hundred per driver call (allocate_many), not one allocate() each;
    the result is the same: qemu-img compare, check, contiguous runs."""
    from blkjobs.formats.qcow2 import Qcow2
    from blkjobs.jobs.blockcopy import PLAN_BATCH
    disk, full, inc = tmp_path / "disk.qcow2", tmp_path / "full.qcow2", tmp_path / "inc.qcow2"
    qemu_img("create", "-f", "qcow2", disk, SIZE)
    qemu_img("convert", "-O", "qcow2", disk, full)
    qemu_img("bitmap", "--add", disk, "b0")
    nclusters = -(-SIZE // K64)
    changed = sorted(random.Random(6).sample(range(0, nclusters - 1, 2), 400))
    qemu_io(disk, *[f"write -P {3 + i % 200} {c * K64} {K64}" for i, c in enumerate(changed)])
    qemu_img("create", "-f", "qcow2", "-b", full, "-F", "qcow2", inc, SIZE)
    eng.open(str(disk), "qcow2", node_name="src")
    eng.open(str(inc), "qcow2", node_name="dst")
    single: list[int] = []
    many: list[int] = []
    orig_one, orig_many = Qcow2.allocate, Qcow2.allocate_many

    def allocate(self, offset, length, undo=None):
        single.append(offset)
        return orig_one(self, offset, length, undo)

    def allocate_many(self, ranges, undo=None):
        many.append(len(ranges))
        return orig_many(self, ranges, undo)
    monkeypatch.setattr(Qcow2, "allocate", allocate)
    monkeypatch.setattr(Qcow2, "allocate_many", allocate_many)
    job = eng.backup("src", "dst", sync="bitmap", bitmap="b0", bitmap_mode="never",
                     job_id="inc")
    assert eng.wait_job(job, 60).value == "completed"
    eng.close()
    assert single == []
    assert sum(many) == len(changed)
    assert len(many) <= 2 * -(-len(changed) // PLAN_BATCH)
    runs = [(r["start"], r["length"]) for r in qemu_map(inc) if r["depth"] == 0 and r["data"]]
    assert runs == [(c * K64, K64) for c in changed]
    # in guest order, one run per call (an L2 table may follow a run)
    hosts = [r["offset"] for r in qemu_map(inc) if r["depth"] == 0 and r["data"]]
    assert hosts == sorted(hosts)
    assert sum(b - a != K64 for a, b in itertools.pairwise(hosts)) < len(many)
    assert qemu_img("compare", disk, inc).returncode == 0
    check_clean(inc)
