"""What to measure: the matrix of workloads x request sizes x threads x
buffered/O_DIRECT, and the shape of the image the copy workload copies.

A :class:`Case` is one cell of the matrix; every contender (blkjobs itself,
fio, dd, ...) that can do the same work runs it, alternating round by round.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from ..errors import UsageError
from ..units import parse_size
from .sizes import format_size, parse_list

# name -> (writes?, random?)  ("copy" reads one file and writes another)
WORKLOADS = {
    "seqread": (False, False),
    "seqwrite": (True, False),
    "randread": (False, True),
    "randwrite": (True, True),
    "copy": (True, False),
}
ALIASES = {"read": "seqread", "write": "seqwrite"}


@dataclass(frozen=True)
class Density:
    """Share (percent) of the copy source that is data, written zeroes, and
    holes (unallocated). A VM disk fresh from an installer is mostly holes;
    a long-lived one mostly data."""
    data: int = 50
    zero: int = 10
    hole: int = 40

    def __str__(self) -> str:
        return f"data={self.data},zero={self.zero},hole={self.hole}"


def parse_density(text: str) -> Density:
    """'data=30,zero=20,hole=50': percentages adding up to 100; a key left
    out is 0 ('data=100' is a fully allocated image)."""
    vals = {"data": 0, "zero": 0, "hole": 0}
    seen = set()
    for part in str(text).split(","):
        key, sep, val = part.partition("=")
        key = key.strip().lower()
        if not sep or key not in vals or key in seen:
            raise UsageError(f"invalid density '{text}': expected data=N,zero=N,hole=N "
                             f"(percentages adding up to 100)")
        try:
            n = int(val.rstrip("%"))
        except ValueError:
            raise UsageError(f"invalid density '{text}': '{val}' is not a percentage") from None
        if not 0 <= n <= 100:
            raise UsageError(f"invalid density '{text}': {key}={n} is not in 0..100")
        vals[key] = n
        seen.add(key)
    if sum(vals.values()) != 100:
        raise UsageError(f"invalid density '{text}': the shares add up to "
                         f"{sum(vals.values())}, not 100")
    return Density(**vals)


def parse_workload(name: str) -> str:
    n = name.strip().lower()
    n = ALIASES.get(n, n)
    if n not in WORKLOADS:
        raise UsageError(f"unknown workload '{name}': choose from {', '.join(WORKLOADS)}")
    return n


def parse_threads(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise UsageError(f"invalid thread count '{text}'") from None
    if not 1 <= n <= 256:
        raise UsageError(f"invalid thread count {n}: must be 1..256")
    return n


def parse_direct(text: str) -> bool:
    t = text.strip().lower()
    if t in ("1", "yes", "true", "on", "direct"):
        return True
    if t in ("0", "no", "false", "off", "buffered"):
        return False
    raise UsageError(f"invalid --direct value '{text}': use 0, 1 or 0,1")


@dataclass(frozen=True)
class Case:
    workload: str       # one of WORKLOADS
    bs: int             # request size, bytes
    threads: int
    direct: bool

    @property
    def writes(self) -> bool:
        return WORKLOADS[self.workload][0]

    @property
    def random(self) -> bool:
        return WORKLOADS[self.workload][1]

    @property
    def label(self) -> str:
        io = "direct" if self.direct else "buffered"
        return f"{self.workload} bs={format_size(self.bs)} jobs={self.threads} {io}"

    def as_dict(self) -> dict:
        return asdict(self)


def build_matrix(workloads: list[str], sizes: list[int], threads: list[int],
                 directs: list[bool], rand_bs: int) -> list[Case]:
    """Every combination, in the order given. Random workloads use
    ``rand_bs`` (4 KiB: they measure IOPS) instead of ``sizes``."""
    cases = []
    for w in workloads:
        bss = [rand_bs] if WORKLOADS[w][1] else sizes
        for bs in bss:
            for j in threads:
                for d in directs:
                    c = Case(w, bs, j, d)
                    if c not in cases:
                        cases.append(c)
    return cases


def parse_matrix(workloads: str, bs: str, threads: str, direct: str,
                 rand_bs: str) -> list[Case]:
    ws = parse_list(workloads, parse_workload, "workload")
    sizes = parse_list(bs, lambda s: parse_size(s, "request size"), "request size")
    for s in sizes + [parse_size(rand_bs, "random request size")]:
        if s < 512 or s > (1 << 30) or s % 512:
            raise UsageError(f"invalid request size {format_size(s)}: must be a multiple "
                             f"of 512 between 512 and 1G")
    js = parse_list(threads, parse_threads, "thread count")
    ds = parse_list(direct, parse_direct, "--direct")
    return build_matrix(ws, sizes, js, ds, parse_size(rand_bs, "random request size"))
