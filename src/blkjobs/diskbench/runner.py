"""Running the matrix: the schedule and the :class:`Runner` (the scratch
directory and the shared files are in :mod:`.workspace`, the contenders in
:mod:`.contenders`, the measuring of one run in :mod:`.measure`).

For every case of the matrix each contender (blkjobs itself first, then the
tools of ``--compare``) runs ``warmup + repeat`` times, interleaved round by
round and in a rotated order each round (A B C, B C A, C A B, ...), so drift
over time (writeback, thermal, a neighbour's job) hits every contender alike;
warm-up rounds are discarded. Everything it creates lives in one scratch
directory under DIR, removed at the end, on error and on Ctrl-C (SIGINT and
SIGTERM) unless ``keep``.

Time enters through ``clock`` (seconds, monotonic) so the scheduling, the
timing of external tools and the progress line are tested with a fake clock;
the C loops time themselves (CLOCK_MONOTONIC, from the first request to the
last completion and fsync).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

from ..native.ioloop import release_buffers
from .contenders import TOOLS, Blkjobs, Contender
from .devio import DeviceCounters
from .latency import Latency, summarize_latency
from .matrix import Case, Density
from .measure import Clock, ToolError
from .sizes import format_bytes
from .stats import Sample, summarize
from .status_line import NullStatusLine, StatusLine
from .workspace import CacheControl, Env, Workspace

HEADROOM = 16 << 20


# -- the schedule --------------------------------------------------------------
def schedule(n_contenders: int, warmup: int, repeat: int) -> list[tuple[int, int, bool]]:
    """(round, contender index, measured?) in run order: every round runs
    every contender once, starting one further each round."""
    out = []
    for r in range(warmup + repeat):
        for k in range(n_contenders):
            out.append((r, (r + k) % n_contenders, r >= warmup))
    return out


@dataclass
class Settings:
    dir: str
    cases: list[Case]
    size: int = 256 << 20
    runtime: float = 0.0
    repeat: int = 5
    warmup: int = 1
    cold: bool = False
    density: Density = field(default_factory=Density)
    compare: list[str] = field(default_factory=list)
    keep: bool = False
    seed: int = 1
    #: --direct not given: O_DIRECT where the file system takes it, else
    #: buffered with a cold cache (see Runner._direct_or_cold)
    direct_auto: bool = False


@dataclass
class Row:
    case: Case
    tool: str
    io: str
    cache: str
    samples: list[Sample] = field(default_factory=list)
    error: str | None = None


class Runner:
    """Runs the matrix of ``settings``; :meth:`run` returns (rows, notes)."""

    def __init__(self, settings: Settings, *, clock: Clock = time.monotonic,
                 progress: StatusLine | None = None,
                 contenders: list[Contender] | None = None,
                 cache: CacheControl | None = None):
        self.s = settings
        self.clock = clock
        self.progress = progress or NullStatusLine()
        self.contenders = contenders
        self.cache = cache
        self.notes: list[str] = []
        self.dev: DeviceCounters | None = None

    def _contenders(self) -> list[Contender]:
        if self.contenders is not None:
            return self.contenders
        out: list[Contender] = [Blkjobs()]
        for name in self.s.compare:
            c = TOOLS[name]()
            why = c.available()
            if why:
                self.notes.append(f"--compare: {why}: left out")
            else:
                out.append(c)
        return out

    def need_bytes(self) -> int:
        s = self.s
        need = HEADROOM
        if any(c.workload != "copy" for c in s.cases):
            need += s.size
        if any(c.workload == "copy" for c in s.cases):
            need += s.size * (s.density.data + s.density.zero) // 100 + s.size
        return need

    def run(self) -> tuple[list[Row], list[str]]:
        s = self.s
        ws = Workspace(s.dir, keep=s.keep)
        try:
            ws.check_space(self.need_bytes())
            self._direct_or_cold(ws)
            cache = self.cache or CacheControl(s.cold)
            note = cache.note()
            if note:
                self.notes.append(note)
            self.dev = DeviceCounters(s.dir)
            self.notes.append(self.dev.why or f"device counters: {self.dev.what}, for every "
                              "row (the whole device's: other work on it during a run is "
                              "counted too)")
            env = Env(ws, s.size, s.runtime, s.density, cache, self.clock, s.seed,
                      progress=self.progress.phase)
            contenders = self._contenders()
            rows = []
            skipped: set[str] = set()
            for case in s.cases:
                rows.extend(self._run_case(case, env, contenders, skipped))
            self.notes.extend(sorted(skipped))
            if s.keep:
                self.notes.append(f"files kept in {ws.path}")
            return rows, self.notes
        finally:
            self.progress.done()
            ws.cleanup()
            release_buffers()

    def _direct_or_cold(self, ws: Workspace) -> None:
        """An explicit --direct fails on a file system that refuses
        O_DIRECT; the default falls back to buffered runs on a cold cache,
        so that the figures are still the disk's, and says so."""
        s = self.s
        if not any(c.direct for c in s.cases):
            return
        if not s.direct_auto:
            ws.probe_direct()
            return
        why = ws.direct_refused()
        if why is None:
            return
        cases: list[Case] = []
        for c in s.cases:
            b = replace(c, direct=False)
            if b not in cases:
                cases.append(b)
        s.cases = cases
        s.cold = True
        self.notes.append(f"the file system of '{s.dir}' refuses O_DIRECT ({why}): measured "
                          "buffered with a cold cache instead (the files' pages evicted "
                          "before every run)")

    def _run_case(self, case: Case, env: Env, contenders: list[Contender],
                  skipped: set) -> list[Row]:
        s = self.s
        if case.workload == "copy":
            env.layout_image()
        else:
            env.layout_data()
        active = []
        for c in contenders:
            why = c.skip(case)
            if why:
                skipped.add(f"{c.name}: {why}")
            else:
                active.append(c)
        self.progress.phase(case.label)
        rows = [Row(case, c.name, c.io(case), env.cache.label(c.io(case) == "direct"))
                for c in active]
        total_runs = (s.warmup + s.repeat)
        for rnd, k, measured in schedule(len(active), s.warmup, s.repeat):
            row, c = rows[k], active[k]
            if row.error:
                continue
            tag = f"{case.label}  round {rnd + 1}/{total_runs}" + \
                  ("" if measured else " (warm-up)") + f"  {c.name}"
            self.progress.step(tag)
            env.cache.before_run(c.files(case, env))
            dev = self.dev or DeviceCounters(s.dir)
            t0, before = self.clock(), dev.snapshot()
            try:
                sample = c.run(case, env, lambda done, _ops: self.progress.update(
                    format_bytes(done)))
            except ToolError as e:
                row.error = str(e)
                continue
            sample = replace(sample, device=dev.delta(before, dev.snapshot(),
                                                      self.clock() - t0))
            if measured:
                row.samples.append(sample)
        return rows


def ranks(rows: list[Row]) -> list[int | None]:
    """Each row's rank by median throughput (1 = fastest) among the rows of
    the same case doing the same kind of I/O: a buffered contender is never
    ranked against a direct one. None for a row without runs."""
    med = [summarize(r.samples).median_bps if r.samples and not r.error else None
           for r in rows]
    out: list[int | None] = []
    for i, r in enumerate(rows):
        m = med[i]
        if m is None:
            out.append(None)
            continue
        out.append(1 + sum(1 for j, o in enumerate(rows) if o.case == r.case and
                           o.io == r.io and (mj := med[j]) is not None and mj > m))
    return out


def row_latency(row: Row) -> Latency | None:
    """The latency of every request of the row's measured runs (None when
    the contender does not measure it)."""
    return summarize_latency([x.latency for x in row.samples if x.latency is not None])


def _run_latency(x: Sample) -> dict | None:
    """One run's latency, as the row's (its histogram, so that a program can
    compare runs with each other or pool them as it likes)."""
    lat = summarize_latency([x.latency]) if x.latency is not None else None
    return lat.as_dict() if lat else None


def result_dicts(rows: list[Row]) -> list[dict]:
    out = []
    for r, rank in zip(rows, ranks(rows), strict=True):
        d = {"case": r.case.as_dict(), "tool": r.tool, "io": r.io, "cache": r.cache,
             "rank": rank, "error": r.error,
             "runs": [{"bytes": x.bytes, "ops": x.ops, "elapsed_s": x.elapsed_s,
                       "cpu_s": x.cpu_s, "peak_rss_bytes": x.rss_bytes,
                       "device": x.device.as_dict() if x.device else None,
                       "tool_disk": x.tool_disk,
                       "block_io": None if x.block_io is None else
                       {"read_bytes": x.block_io[0], "write_bytes": x.block_io[1]},
                       "latency": _run_latency(x)}
                      for x in r.samples],
             "summary": summarize(r.samples).as_dict() if r.samples else None}
        lat = row_latency(r)
        d["latency"] = lat.as_dict() if lat else None
        out.append(d)
    return out
