"""The module structure (docs/architecture.md): no import circles, and
imports point one way -- cli/daemon -> engine -> jobs -> job core and graph
-> formats -> native. Every import statement counts, wherever it is in a
file (under TYPE_CHECKING, inside a function) and ``from . import x``
counts as importing the package too (its ``__init__`` runs)."""
from __future__ import annotations

import ast
import functools
import re
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"


def _modules(src: Path) -> dict[str, Path]:
    mods = {}
    for p in (src / "blkjobs").rglob("*.py"):
        m = ".".join(p.relative_to(src).with_suffix("").parts)
        if m.endswith(".__init__"):
            m = m[: -len(".__init__")]
        mods[m] = p
    return mods


def _edges() -> dict[str, set[str]]:
    """Each module's imports of other modules under SRC (parsed once per SRC
    for the whole run: four tests read them; a copy for each caller)."""
    return {m: set(ts) for m, ts in _edges_under(SRC).items()}


@functools.cache
def _edges_under(src: Path) -> dict[str, frozenset[str]]:
    mods = _modules(src)
    edges: dict[str, set[str]] = {m: set() for m in mods}
    for m, p in mods.items():
        pkg = m if p.name == "__init__.py" else m.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                    tgt = ".".join(base + ([node.module] if node.module else []))
                else:
                    tgt = node.module or ""
                cands = [tgt] + [f"{tgt}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                cands = [a.name for a in node.names]
            else:
                continue
            edges[m] |= {c for c in cands if c in mods and c != m}
    return {m: frozenset(ts) for m, ts in edges.items()}


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    idx: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10000))

    def visit(v: str) -> None:
        idx[v] = low[v] = len(idx)
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in idx:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], idx[w])
        if low[v] == idx[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in idx:
            visit(v)
    return out


def test_no_import_cycles():
    assert _cycles(_edges()) == []


def _area(mod: str) -> str:
    """``blkjobs.jobs.mirror`` -> ``jobs``; ``blkjobs`` -> ``blkjobs``."""
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 else "blkjobs"


#: what each part may import besides itself (errors and units: everyone)
ALLOWED = {
    "native": set(),
    "formats": {"native"},
    "graph": {"formats", "native"},
    "jobmodel": set(),                              # the job core knows nothing of blocks
    "options": {"jobmodel"},
    "jobs": {"jobmodel", "graph", "formats", "native"},
    "imageops": {"graph", "formats", "native"},
    "engine": {"jobs", "jobmodel", "graph", "formats", "native", "options"},
    "diskbench": {"native"},
    "nbd": {"native"},                         # the protocol; its data path in C
    "daemon": {"blkjobs", "engine", "jobmodel", "graph", "formats", "native", "options", "nbd"},
    "cli": {"blkjobs", "daemon", "engine", "imageops", "diskbench", "jobmodel", "graph", "formats",
            "native", "options", "nbd"},
    # the package's lazy exports (TYPE_CHECKING imports for type checkers)
    "blkjobs": {"engine", "jobmodel", "graph", "options"},
    "__main__": {"cli"},
}


def test_layering():
    bad = []
    for m, targets in _edges().items():
        area = _area(m)
        for t in targets:
            ta = _area(t)
            if ta in (area, "errors", "units") or ta in ALLOWED[area]:
                continue
            bad.append(f"{m} -> {t}")
    assert sorted(bad) == []


def test_nothing_imports_the_facade_from_below():
    importers = sorted(m for m, ts in _edges().items() if "blkjobs.engine" in ts)
    assert all(_area(m) in ("cli", "daemon", "blkjobs") for m in importers), importers


def test_job_core_imports_nothing_of_blocks():
    for m, ts in _edges().items():
        if _area(m) == "jobmodel":
            assert {_area(t) for t in ts} <= {"jobmodel", "errors", "units"}, (m, ts)


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_relative_package_import_counts_as_importing_the_package(tmp_path, monkeypatch):
    """``from . import x`` runs the package's ``__init__``: an edge to it."""
    pkg = tmp_path / "blkjobs" / "p"
    pkg.mkdir(parents=True)
    (tmp_path / "blkjobs" / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("from .a import A\n")
    (pkg / "a.py").write_text("A = 1\n")
    (pkg / "b.py").write_text("from . import a\n")
    monkeypatch.setattr(sys.modules[__name__], "SRC", tmp_path)
    edges = _edges()
    assert edges["blkjobs.p.b"] == {"blkjobs.p", "blkjobs.p.a"}


#: sizes a reader can hold in mind; longer needs a reason written at its top
MAX_FILE_LINES = 600
MAX_FUNCTION_LINES = 80
LONG_REASON = "# long because:"


def _too_long(root: Path) -> list[str]:
    out = []
    for p in sorted(root.rglob("*.py")):
        text = p.read_text()
        lines = text.splitlines()
        rel = p.relative_to(root)
        if len(lines) > MAX_FILE_LINES and LONG_REASON not in "\n".join(lines[:30]):
            out.append(f"{rel}: {len(lines)} lines")
        for node in ast.walk(ast.parse(text)):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            n = (node.end_lineno or node.lineno) - node.lineno + 1
            head = "\n".join(lines[node.lineno - 1:node.lineno + 4])
            if n > MAX_FUNCTION_LINES and LONG_REASON not in head:
                out.append(f"{rel}:{node.lineno} {node.name}: {n} lines")
    return out


def test_no_file_or_function_too_long_without_a_reason():
    assert _too_long(SRC / "blkjobs") == []


def test_the_size_check_finds_a_long_function(tmp_path):
    body = "".join(f"    x{i} = {i}\n" for i in range(MAX_FUNCTION_LINES))
    (tmp_path / "m.py").write_text(f"def f():\n{body}\n\ndef g():\n    {LONG_REASON} a table\n"
                                   f"{body}")
    assert _too_long(tmp_path) == ["m.py:1 f: 81 lines"]


#: the names a format driver or a job driver goes by in src/blkjobs: the last
#: part of the expression probed (``node.driver``, ``job.driver``, ``drv``...)
_DRIVER_NAMES = {"driver", "drv", "d", "t", "inner", "img", "node", "gnode", "new", "wrapper"}
_PROBE = re.compile(r"\b(?:getattr|hasattr)\(\s*([A-Za-z_][\w.()]*)\s*,\s*[\"'](\w+)[\"']")
#: probes kept, as "path:expression:name" (each with its reason); none today:
#: the Driver contract (formats/base.py) and BlockJob (jobs/base.py) declare
#: every attribute callers ask of a driver, with its neutral default. Probes
#: of things that are not drivers are not counted: nbd/fastpath.py's
#: ``hasattr(exp.backend, "plan_reads")`` (an NBD export backend: the C path
#: is an optional part of that protocol, FastBackend), blockcopy_writes.py's
#: ``getattr(hdr, "version", 3)`` (the header record of a qcow2 or luks image,
#: or None), graph/node.py's ``getattr(m, "zero_data", False)`` (a Mapping)
PROBES_ALLOWED: dict[str, str] = {}


def _driver_probes(root: Path) -> list[str]:
    out = []
    for p in sorted(root.rglob("*.py")):
        for m in _PROBE.finditer(p.read_text()):
            expr, name = m.groups()
            if expr.rsplit(".", 1)[-1].rstrip("()") in _DRIVER_NAMES:
                key = f"{p.relative_to(root)}:{expr}:{name}"
                if key not in PROBES_ALLOWED:
                    out.append(key)
    return out


def test_drivers_are_asked_what_they_declare_never_probed():
    """A format or job driver declares what callers ask of it (the Driver
    contract, BlockJob): a new getattr/hasattr probe of one fails here."""
    assert _driver_probes(SRC / "blkjobs") == []


def test_the_probe_check_finds_a_probe(tmp_path):
    (tmp_path / "m.py").write_text('x = getattr(node.driver, "spec_name", None)\n'
                                   'y = hasattr(d, "dst")\nz = getattr(exp.backend, "f", 0)\n'
                                   'w = getattr(n.below_filters().driver, "file_length", 0)\n')
    assert _driver_probes(tmp_path) == ["m.py:node.driver:spec_name", "m.py:d:dst",
                                        "m.py:n.below_filters().driver:file_length"]
