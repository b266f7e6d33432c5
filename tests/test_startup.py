"""Start-up: ``blkjobs --version`` answers without importing argparse (nor
typing, re, enum under it) nor signal (enum under it too); ``info`` imports neither json (unless
``--output json``) nor shutil. The output is argparse's."""
from __future__ import annotations

import itertools
import os
import re
import subprocess
import sys

import blkjobs
from conftest import run_blkjobs
from qemu_oracle import qemu_img, qemu_io
from test_nbd_client import servers  # noqa: F401  (the NBD servers fixture)

PROBE = """
import sys
sys.argv = ["blkjobs"] + sys.argv[1:]
from blkjobs.cli.main import main
rc = main()
sys.stdout.flush()
print(sorted(m for m in ("argparse", "typing", "json", "shutil", "signal", "enum") if m in sys.modules),
      file=sys.stderr)
raise SystemExit(rc)
"""


def probe(*args):
    p = subprocess.run([sys.executable, "-c", PROBE, *map(str, args)], capture_output=True,
                       text=True, timeout=60)
    return p.returncode, p.stdout, p.stderr.strip()


def test_version_without_argparse():
    for opt in ("--version", "-V"):
        rc, out, mods = probe(opt)
        assert (rc, out, mods) == (0, f"blkjobs {blkjobs.__version__}\n", "[]")
    # through argparse (another argument follows): the same answer
    p = run_blkjobs("--version", "info")
    assert (p.returncode, p.stdout) == (0, f"blkjobs {blkjobs.__version__}\n")


def test_info_imports(tmp_path):
    img = tmp_path / "a.qcow2"
    qemu_img("create", "-f", "qcow2", img, "1M")
    rc, out, mods = probe("info", img)
    assert rc == 0 and out.startswith(f"image: {img}\n")
    assert "json" not in mods and "shutil" not in mods
    rc, out, mods = probe("info", "--output", "json", img)
    assert rc == 0 and '"virtual-size": 1048576' in out and "json" not in mods


HEAVY_PROBE = """
import sys
heavy = sys.argv[1].split(",")
sys.argv = ["blkjobs"] + sys.argv[2:]
from blkjobs.cli.main import main
rc = main()
sys.stdout.flush()
print(sorted(m for m in heavy if m in sys.modules), file=sys.stderr)
raise SystemExit(rc)
"""


def run_heavy_probe(heavy: tuple[str, ...], args: list) -> subprocess.CompletedProcess:
    """``blkjobs ARGS`` run in-process by a fresh interpreter; its stderr
    ends with which of the modules ``heavy`` it imported (sorted)."""
    return subprocess.run([sys.executable, "-c", HEAVY_PROBE, ",".join(heavy), *map(str, args)],
                          capture_output=True, text=True, timeout=60)


LOOKERS = ("blkjobs.formats.luks", "blkjobs.formats.nbd", "blkjobs.formats.qcow2.check",
           "uuid", "hashlib", "urllib.parse")


def test_commands_that_look_import_no_crypto_nbd_or_check(tmp_path):
    """info and map of a plain qcow2 (and a raw file) need neither the LUKS
    code (hashlib, uuid), the NBD client (urllib) nor qcow2's check;
    check needs its module and nothing else of those."""
    img, raw = tmp_path / "a.qcow2", tmp_path / "b.raw"
    qemu_img("create", "-f", "qcow2", img, "1M")
    qemu_img("create", "-f", "raw", raw, "1M")
    for args, want in ((["info", img], "[]"), (["info", raw], "[]"), (["map", img], "[]"),
                       (["check", img], "['blkjobs.formats.qcow2.check']")):
        p = run_heavy_probe(LOOKERS, args)
        assert (p.returncode, p.stderr.strip()) == (0, want), args


CONVERTER = """
import sys
sys.argv = ["blkjobs"] + sys.argv[1:]
from blkjobs.cli.main import main
rc = main()
heavy = ("blkjobs.formats.qcow2", "blkjobs.formats.nbd", "blkjobs.graph.node",
         "blkjobs.graph.chain", "blkjobs.imageops.convert_chain", "blkjobs.imageops.rebase",
         "typing", "dataclasses", "threading", "blkjobs.cli.cmd_create")
print(sorted(m for m in heavy if m in sys.modules), file=sys.stderr)
raise SystemExit(rc)
"""


def test_raw_convert_imports_no_qcow2_nor_graph(tmp_path):
    """A raw -> raw convert (one C engine over two files) imports neither the
    qcow2 driver (the format is probed by its magic), the NBD driver, the
    graph's nodes and chains, the chain converter, rebase, typing,
    dataclasses (with inspect: ~8 ms) nor threading (the engine's threads are
    C's) (start-up time is part of every copy);
    raw -> qcow2 imports what it needs (not threading either: the qcow2
    driver makes its pins' condition when a drain has pins to wait for). The copies are qemu-img's bytes.
    Neither imports create's command module (-o only)."""
    src = tmp_path / "a.raw"
    src.write_bytes(b"\1" * 65536 + bytes(65536) + b"\2" * 4096)
    for fmt, want in (("raw", "[]"),
                      ("qcow2", "['blkjobs.formats.qcow2', 'blkjobs.graph.chain', "
                                "'blkjobs.graph.node', 'blkjobs.imageops.convert_chain']")):
        dst = tmp_path / f"b.{fmt}"
        p = subprocess.run([sys.executable, "-c", CONVERTER, "convert", "-O", fmt, str(src),
                            str(dst)], capture_output=True, text=True, timeout=60)
        assert (p.returncode, p.stderr.strip()) == (0, want), fmt
        assert qemu_img("compare", "-f", "raw", "-F", fmt, src, dst).returncode == 0


PATHS = """
import sys
sys.argv = ["blkjobs"] + sys.argv[1:]
from blkjobs.cli.main import main
rc = main()
sys.stdout.flush()
heavy = ("argparse", "re", "collections", "dataclasses", "inspect", "typing", "json", "base64", "hashlib", "uuid",
         "urllib.parse", "blkjobs.formats.luks", "blkjobs.formats.nbd",
         "blkjobs.formats.qcow2.check")
print(sorted(m for m in heavy if m in sys.modules), file=sys.stderr)
raise SystemExit(rc)
"""


def _paths_probe(*args):
    p = subprocess.run([sys.executable, "-c", PATHS, *map(str, args)], capture_output=True,
                       text=True, timeout=60)
    return p.returncode, p.stdout, p.stderr.strip()


def _chain(tmp_path):
    """A 3-deep qcow2 chain with data in each layer, and the same as raw."""
    from test_nbd_client import qio
    names = [tmp_path / n for n in ("base.qcow2", "mid.qcow2", "top.qcow2")]
    qemu_img("create", "-f", "qcow2", names[0], "1M")
    for below, img in itertools.pairwise(names):
        qemu_img("create", "-f", "qcow2", "-b", below, "-F", "qcow2", img)
    for i, img in enumerate(names):
        qio("qcow2", str(img), f"write -P {i + 1} {i * 256}k 192k")
    return names[-1]


def test_qcow2_converts_import_neither_dataclasses_typing_nor_json(tmp_path):
    """raw -> qcow2, qcow2 -> raw and a 3-deep chain -> qcow2: no argparse
    (the command line is plain: cli/quickparse.py) nor re (units reads
    plain sizes, blockspec its option strings, without it), no dataclasses (with inspect, ast, dis, tokenize: ~8 ms), typing (~2.5 ms),
    json, base64, the LUKS code (hashlib, uuid), the NBD client (urllib) nor
    qcow2's check. The copies are qemu-img's bytes."""
    src = tmp_path / "a.raw"
    src.write_bytes(b"\1" * 65536 + bytes(65536) + b"\2" * 4096)
    top = _chain(tmp_path)
    q = tmp_path / "a.qcow2"
    for args, ref, want in (
            (["-O", "qcow2", src, tmp_path / "b.qcow2"], src, "[]"),
            (["-O", "raw", top, q.with_suffix(".raw")], top, "[]"),
            (["-O", "qcow2", top, q], top, "[]")):
        rc, _, mods = _paths_probe("convert", *args)
        assert (rc, mods) == (0, want), args
        assert qemu_img("compare", ref, args[-1]).returncode == 0


def test_looking_commands_import_json_only_for_json(tmp_path):
    """info, map, check, compare of qcow2 images: no argparse, re, dataclasses, typing,
    base64, LUKS nor NBD; no json (nor re, under it) for ``--output json``
    either (cli.jsonout writes it); qcow2's check only for check. The
    outputs are what the commands print."""
    top = _chain(tmp_path)
    a, b = tmp_path / "a.qcow2", tmp_path / "b.qcow2"
    qemu_img("convert", "-O", "qcow2", top, a)
    qemu_img("convert", "-O", "qcow2", top, b)
    for args, want, out in (
            (["info", a], "[]", f"image: {a}\n"),
            (["info", "--output", "json", a], "[]", "{\n"),
            (["map", top], "[]", "Offset          Length          Mapped to       File\n"),
            (["map", "--output", "json", top], "[]", '[{ "start": 0, '),
            (["check", a], "['blkjobs.formats.qcow2.check']", "No errors were found"),
            (["check", "--output", "json", a],
             "['blkjobs.formats.qcow2.check']", "{\n"),
            (["compare", a, b], "[]", "Images are identical.\n")):
        rc, stdout, mods = _paths_probe(*args)
        assert (rc, mods) == (0, want), args
        assert stdout.startswith(out), (args, stdout)


def test_nbd_convert_imports_neither_dataclasses_typing_nor_qcow2(tmp_path, servers):
    """A convert from an NBD export (the client) to a raw file: no
    argparse, dataclasses, typing, json, base64, LUKS nor qcow2's check; the bytes are
    the export's."""
    qemu_nbd, _ = servers
    src = tmp_path / "a.raw"
    src.write_bytes(b"\1" * 65536 + bytes(65536) + b"\2" * 4096)
    s = qemu_nbd(str(src), "raw")
    rc, _, mods = _paths_probe("convert", s.uri, tmp_path / "o.raw")
    # (collections: threading's, for the client's connections)
    assert (rc, mods) == (0, "['blkjobs.formats.nbd', 'collections']")
    assert qemu_img("compare", "-f", "raw", "-F", "raw", src, tmp_path / "o.raw").returncode == 0


EXITS = """
import os, sys
mode, sys.argv = sys.argv[1], ["blkjobs"] + sys.argv[2:]
import blkjobs.cli.main as cli
if mode == "quick":
    _exit = os._exit
    def noted(rc):
        sys.stderr.write(f"[os._exit({rc})]")
        sys.stderr.flush()
        _exit(rc)
    os._exit = noted
    cli.run()
else:
    raise SystemExit(cli.main())
"""


def _exits(mode, *args):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # buffered, as usual
    p = subprocess.run([sys.executable, "-c", EXITS, mode, *map(str, args)],
                       capture_output=True, text=True, timeout=60, env=env)
    # (-p's lines hold the rate of the moment: the rest must be equal)
    return p.returncode, re.sub(r"[0-9.]+ [KMGT]?i?B/s", "RATE", p.stdout), p.stderr


def test_quick_exit_changes_no_output_nor_status(tmp_path):
    """``blkjobs`` (cli.main.run) ends with os._exit after the command: the
    same stdout, stderr and status as the interpreter's exit, for copies,
    progress lines, JSON output, errors and their statuses; and the ordinary
    exit where os._exit would skip something (-v's logging handler: an
    atexit function), and argparse's own exits (SystemExit out of main)."""
    src = tmp_path / "a.raw"
    src.write_bytes(b"\1" * 65536 + bytes(65536) + b"\2" * 4096)
    q = tmp_path / "a.qcow2"
    qemu_img("create", "-f", "qcow2", q, "1M")
    b = tmp_path / "b.qcow2"
    qemu_img("convert", "-O", "qcow2", src, b)
    cases = [
        (True, 0, ["convert", "-O", "raw", src, tmp_path / "o.raw"]),
        (True, 0, ["convert", "-p", "-O", "qcow2", src, tmp_path / "o.qcow2"]),
        (True, 0, ["info", "--output", "json", q]),
        (True, 0, ["map", "--output", "json", b]),
        (True, 0, ["check", q]),
        (True, 1, ["compare", q, b]),
        (True, 1, ["info", tmp_path / "missing.qcow2"]),
        (True, 1, ["convert", "-O", "vmdk", src, tmp_path / "x"]),
        (True, 1, ["--error-format", "json", "convert", "-O", "raw", tmp_path / "missing",
                   tmp_path / "x"]),
        (False, 0, ["-v", "info", q]),
        (False, 1, ["convert", "--no-such-option", src, tmp_path / "x"]),  # argparse's exit
    ]
    for quick, rc, args in cases:
        ordinary = _exits("ordinary", *args)
        got = _exits("quick", *args)
        said = f"[os._exit({rc})]"
        assert got[0] == ordinary[0] == rc, (args, got, ordinary)
        assert got[1] == ordinary[1], args
        assert got[2] == ordinary[2] + (said if quick else ""), (args, got[2], ordinary[2])
        assert "Traceback" not in got[2]
    assert qemu_img("compare", "-f", "raw", "-F", "raw", src, tmp_path / "o.raw").returncode == 0
    assert qemu_img("compare", "-f", "raw", "-F", "qcow2", src, tmp_path / "o.qcow2").returncode == 0
    assert qemu_img("check", tmp_path / "o.qcow2").returncode == 0


NAMES = ("blkjobs.graph.blockspec", "blkjobs.graph.blockspec_net", "blkjobs.cli.opts_help",
         "blkjobs.formats.qcow2.create", "blkjobs.formats.secrets", "contextlib")


def _probe_images(tmp_path):
    """The probes' images: a raw ``src``, a chain ``top`` and two qcow2
    copies ``a``, ``b`` of it (by qemu-img)."""
    src = tmp_path / "a.raw"
    src.write_bytes(b"\1" * 65536 + bytes(65536) + b"\2" * 4096)
    top = _chain(tmp_path)
    a, b = tmp_path / "a.qcow2", tmp_path / "b.qcow2"
    qemu_img("convert", "-O", "qcow2", top, a)
    qemu_img("convert", "-O", "qcow2", top, b)
    return src, top, a, b


def _probe(names, args, want, out):
    """Run ``args`` under the import probe of ``names``: it succeeds, of
    ``names`` imports exactly ``want``, and its output starts with ``out``."""
    p = run_heavy_probe(names, args)
    assert (p.returncode, p.stderr.strip()) == (0, want), args
    assert p.stdout.startswith(out), (args, p.stdout)


def _copies_as_qemu_img(tmp_path, src, top):
    """The probes' copies (o.raw, o.qcow2 of ``src``; c.raw, c.qcow2 of the
    chain ``top``) equal their sources, and the qcow2 one checks clean."""
    assert qemu_img("compare", "-f", "raw", "-F", "raw", src, tmp_path / "o.raw").returncode == 0
    assert qemu_img("compare", "-f", "raw", "-F", "qcow2", src, tmp_path / "o.qcow2").returncode == 0
    assert qemu_img("compare", top, tmp_path / "c.raw").returncode == 0
    assert qemu_img("compare", top, tmp_path / "c.qcow2").returncode == 0
    assert qemu_img("check", tmp_path / "c.qcow2").returncode == 0


def test_plain_names_import_no_spec_reader_nor_qcow2_create(tmp_path):
    """Commands on plain file names (no json:, file:, blkdebug:, no
    --image-opts, no -o) import neither the reader of qemu-img's other name
    syntaxes (graph.blockspec), -o's help, the secrets (no key bound
    without --object or a key option) nor contextlib (the two
    ``opening`` context managers are classes); qcow2's create only where a
    qcow2 target is made. The outputs are the commands' usual ones, and a
    json: name (the spec reader imported when needed) still opens."""
    src, top, a, b = _probe_images(tmp_path)
    create = "['blkjobs.formats.qcow2.create']"
    for args, want, out in (
            (["convert", "-O", "raw", src, tmp_path / "o.raw"], "[]", ""),
            (["convert", "-O", "qcow2", src, tmp_path / "o.qcow2"], create, ""),
            (["convert", "-O", "raw", top, tmp_path / "c.raw"], "[]", ""),
            (["convert", "-O", "qcow2", top, tmp_path / "c.qcow2"], create, ""),
            (["info", a], "[]", f"image: {a}\n"),
            (["map", top], "[]", "Offset          Length          Mapped to       File\n"),
            (["check", a], "[]", "No errors were found"),
            (["compare", a, b], "[]", "Images are identical.\n"),
            (["info", f'json:{{"file": {{"driver": "file", "filename": "{a}"}}}}'],
             "['blkjobs.graph.blockspec', 'blkjobs.graph.blockspec_net', 'contextlib']",
             f"image: {a}\n")):
        _probe(NAMES, args, want, out)
    _copies_as_qemu_img(tmp_path, src, top)


STOP21 = ("importlib", "warnings", "blkjobs.graph.filter", "blkjobs.imageops.convert_raw",
          "contextvars", "blkjobs.cli.image_opts", "blkjobs.cli.quickparse_table",
          "blkjobs.cli.cache_mode")


def test_qcow2_commands_import_only_what_they_use(tmp_path):
    """The qcow2 converts, info, map, check and compare on plain names
    import neither importlib (with warnings: the commands' modules and the
    graph's names come by import statements), the graph's filter driver (a
    job's filter nodes), raw -> raw's converter (raw -> raw only) nor
    contextvars (the flag check sets while it opens the image: made by
    check alone), the --image-opts/--object module (the blkdebug filter is
    registered without it), -t/-T's module (main applies them; the module
    adds them to a parser) nor a module of quickparse's table (it is at the
    end of quickparse.py). The outputs and the copies are the commands'
    usual ones."""
    src, top, a, b = _probe_images(tmp_path)
    for args, want, out in (
            (["convert", "-O", "raw", src, tmp_path / "o.raw"],
             "['blkjobs.imageops.convert_raw']", ""),
            (["convert", "-O", "qcow2", src, tmp_path / "o.qcow2"], "[]", ""),
            (["convert", "-O", "raw", top, tmp_path / "c.raw"], "[]", ""),
            (["convert", "-O", "qcow2", top, tmp_path / "c.qcow2"], "[]", ""),
            (["info", a], "[]", f"image: {a}\n"),
            (["map", top], "[]", "Offset          Length          Mapped to       File\n"),
            (["check", a], "['contextvars']", "No errors were found"),
            (["compare", a, b], "[]", "Images are identical.\n")):
        _probe(STOP21, args, want, out)
    _copies_as_qemu_img(tmp_path, src, top)


ENUMS = """
import enum, sys
sys.argv = ["blkjobs"] + sys.argv[1:]
from blkjobs.cli.main import main
rc = main()
sys.stdout.flush()
print(sorted(f"{c.__module__}.{c.__qualname__}" for name, m in list(sys.modules.items())
             if name.startswith("blkjobs") and m is not None for c in vars(m).values()
             if isinstance(c, enum.EnumType) and c.__module__ == name), file=sys.stderr)
raise SystemExit(rc)
"""


def test_image_commands_build_no_enum(tmp_path):
    """Each enum class is ~1 M instructions to build: no image command
    builds one (graph.perm's Perm, native.copy's RunResult and the drivers'
    Kind are plain int classes). The outputs are the commands' usual ones."""
    src = tmp_path / "a.raw"
    src.write_bytes(b"\1" * 65536 + bytes(65536) + b"\2" * 4096)
    a = tmp_path / "a.qcow2"
    qemu_img("convert", "-O", "qcow2", src, a)
    for args, out in (
            (["convert", "-O", "raw", src, tmp_path / "o.raw"], ""),
            (["convert", "-O", "qcow2", src, tmp_path / "o.qcow2"], ""),
            (["convert", "-O", "raw", a, tmp_path / "q.raw"], ""),
            (["info", a], f"image: {a}\n"),
            (["map", a], "Offset          Length          Mapped to       File\n"),
            (["check", a], "No errors were found")):
        p = subprocess.run([sys.executable, "-c", ENUMS, *map(str, args)], capture_output=True,
                           text=True, timeout=60)
        assert (p.returncode, p.stderr.strip()) == (0, "[]"), args
        assert p.stdout.startswith(out), (args, p.stdout)
    assert qemu_img("compare", "-f", "raw", "-F", "raw", src, tmp_path / "o.raw").returncode == 0
    assert qemu_img("compare", "-f", "raw", "-F", "qcow2", src, tmp_path / "o.qcow2").returncode == 0
    assert qemu_img("compare", "-f", "raw", "-F", "raw", src, tmp_path / "q.raw").returncode == 0


def test_kind_reads_as_the_enum_it_was():
    """formats.base.Kind, a plain int class now: its members equal their
    values, hash as them, are Kind instances with the enum's name, repr and
    str."""
    from blkjobs.formats.base import Kind
    from blkjobs.native.copy import RunResult
    names = ("DATA", "ZERO", "UNALLOCATED", "COMPRESSED")
    for value, name in enumerate(names):
        k = getattr(Kind, name)
        assert (isinstance(k, Kind), k == value, hash(k) == hash(value), k.name, k.value) == \
            (True, True, True, name, value)
        assert (repr(k), str(k), f"{k}") == (f"<Kind.{name}: {value}>", str(value), str(value))
    assert (RunResult.DONE, RunResult.NEED_MORE, RunResult.TIMEOUT) == (0, 1, 2)


BUFFER_PATH = ("blkjobs.imageops.convert_nbd", "blkjobs.imageops.convert_faults")


def test_file_converts_import_no_buffer_path(tmp_path, servers):
    """A convert between local files (raw -> raw, raw -> qcow2, qcow2 ->
    raw, a 3-deep chain -> qcow2) imports neither the buffer path
    (convert_nbd: NBD, encrypted images, --salvage) nor the fault-injected
    source's copy (convert_faults): the command's entry point picks the
    converter first. An NBD source loads convert_nbd, a blkdebug source
    both; every copy's bytes are the source's."""
    qemu_nbd, _ = servers
    src = tmp_path / "a.raw"
    src.write_bytes(b"\1" * 65536 + bytes(65536) + b"\2" * 4096)
    top = _chain(tmp_path)
    conf = tmp_path / "bd.conf"
    conf.write_text("")
    exported = tmp_path / "e.raw"           # (the server holds its file's lock)
    exported.write_bytes(src.read_bytes())
    s = qemu_nbd(str(exported), "raw")
    both = "['blkjobs.imageops.convert_faults', 'blkjobs.imageops.convert_nbd']"
    for args, want, like in (
            (["convert", "-O", "raw", src, tmp_path / "o.raw"], "[]", src),
            (["convert", "-O", "qcow2", src, tmp_path / "o.qcow2"], "[]", src),
            (["convert", "-O", "raw", top, tmp_path / "c.raw"], "[]", top),
            (["convert", "-O", "qcow2", top, tmp_path / "c.qcow2"], "[]", top),
            (["convert", "-O", "raw", s.uri, tmp_path / "n.raw"],
             "['blkjobs.imageops.convert_nbd']", src),
            (["convert", "-f", "raw", "-O", "raw", f"blkdebug:{conf}:{src}", tmp_path / "f.raw"],
             both, src)):
        p = run_heavy_probe(BUFFER_PATH, args)
        assert (p.returncode, p.stderr.strip()) == (0, want), args
        assert qemu_img("compare", like, args[-1]).returncode == 0, args
    assert qemu_img("check", tmp_path / "c.qcow2").returncode == 0


SNAPSHOT_MODULES = ("blkjobs.formats.qcow2.check_snapshots", "blkjobs.formats.qcow2.snapshots")


def test_check_imports_snapshot_table_modules_only_for_snapshots(tmp_path):
    """check reads the snapshot table's modules only when the header names
    snapshots or a table offset the check must refuse; an image without
    snapshots is checked without them, with the same outcome. With a
    snapshot, or with no snapshot but a misaligned table offset, they are
    imported and the outcome is qemu-img's (its words, our name in front)."""
    img, snap, bad = tmp_path / "a.qcow2", tmp_path / "s.qcow2", tmp_path / "bad.qcow2"
    for name in (img, snap, bad):
        qemu_img("create", "-f", "qcow2", name, "1M")
    qemu_img("snapshot", "-c", "s1", snap)
    with open(bad, "r+b") as f:            # snapshots_offset: 512, nb_snapshots stays 0
        f.seek(64)
        f.write((512).to_bytes(8, "big"))
    both = str(list(SNAPSHOT_MODULES))
    for name, want, rc in ((img, "[]", 0), (snap, both, 0), (bad, both, 1)):
        p = run_heavy_probe(SNAPSHOT_MODULES, ["check", name])
        q = qemu_img("check", name, check=False)
        assert q.returncode == rc, name
        assert (p.returncode, p.stderr.strip().splitlines()[-1]) == (rc, want), name
        assert p.stdout == q.stdout, name
        assert p.stderr.splitlines()[:-1] == \
            [line.replace("qemu-img:", "blkjobs:") for line in q.stderr.splitlines()], name


USR1_PROBE = """
import os, sys
heavy, pending = sys.argv[1].split(","), sys.argv[2] == "pending"
sys.argv = ["blkjobs"] + sys.argv[3:]
if pending:         # a SIGUSR1 waiting as the command starts (blocked: not delivered)
    import signal
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
    os.kill(os.getpid(), signal.SIGUSR1)
    for m in ("signal", "enum", "functools", "collections"):    # (this probe's own)
        sys.modules.pop(m, None)
from blkjobs.cli.main import main
rc = main()
sys.stdout.flush()
print(sorted(m for m in heavy if m in sys.modules), file=sys.stderr)
raise SystemExit(rc)
"""

NO_METER = ("signal", "enum", "functools", "collections", "blkjobs.cli.copy_progress",
            "blkjobs.native.ratelimit")


def test_raw_convert_imports_neither_signal_nor_progress_meter(tmp_path):
    """A raw -> raw convert sets its signals up through _signal (signal
    would build its enums, with functools and collections under them),
    imports no progress meter without a progress output (-p, -q, a SIGUSR1
    not pending) nor the rate limiter without -r; -p imports the meter, -r
    the limiter (qcow2 converts neither, without -r; nor collections:
    the qcow2 modules import their type names only for type checking, and
    refcount blocks are decoded without array). A SIGUSR1 pending as
    the copy starts is answered as before: one line on stderr, the copy
    carries on. Every copy is the source's bytes."""
    src = tmp_path / "a.raw"
    src.write_bytes(b"\1" * 65536 + bytes(65536) + b"\2" * 4096)
    meter, limiter = "'blkjobs.cli.copy_progress'", "'blkjobs.native.ratelimit'"
    for n, (pending, opts, fmt, want) in enumerate((
            (False, [], "raw", "[]"),
            (False, ["-q"], "raw", "[]"),
            (False, ["-p"], "raw", f"[{meter}]"),
            (False, ["-r", "100M"], "raw", f"[{limiter}]"),
            (True, [], "raw", f"[{meter}]"),
            (False, [], "qcow2", "[]"))):
        dst = tmp_path / f"o{n}.{fmt}"
        p = subprocess.run([sys.executable, "-c", USR1_PROBE, ",".join(NO_METER),
                            "pending" if pending else "-", "convert", *opts, "-O", fmt, src, dst],
                           capture_output=True, text=True, timeout=60)
        lines = p.stderr.splitlines()
        assert (p.returncode, lines[-1]) == (0, want), (pending, opts, fmt)
        assert lines[:-1] == (["    (0.00/100%)"] if pending else []), (pending, opts)
        assert qemu_img("compare", "-f", "raw", "-F", fmt, src, dst).returncode == 0


def test_raw_convert_imports_no_driver_contract(tmp_path):
    """A raw -> raw convert uses no driver: it imports neither the driver
    contract (formats.base: a module and seven classes) nor a driver; the
    formats package gives base's names when asked (the same objects), and
    the files are opened with the same checks (a directory or a FIFO as
    source: one line, status 1; the FIFO not read). The copy is the
    source's bytes; a raw -> qcow2 convert imports the contract as
    before."""
    src = tmp_path / "a.raw"
    src.write_bytes(b"\1" * 65536 + bytes(65536) + b"\2" * 4096)
    base = ("blkjobs.formats.base", "blkjobs.formats.raw")
    _probe(base, ["convert", "-O", "raw", src, tmp_path / "o.raw"], "[]", "")
    assert qemu_img("compare", "-f", "raw", "-F", "raw", src, tmp_path / "o.raw").returncode == 0
    _probe(base, ["convert", "-O", "qcow2", src, tmp_path / "o.qcow2"], str(list(base)), "")
    assert qemu_img("compare", "-f", "raw", "-F", "qcow2", src,
                    tmp_path / "o.qcow2").returncode == 0
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "dir").mkdir()
    for name, why in (("fifo", "not a regular file or block device"), ("dir", "Is a directory")):
        p = run_heavy_probe(base, ["convert", "-O", "raw", tmp_path / name, tmp_path / "x.raw"])
        assert (p.returncode, p.stdout) == (1, "")
        assert p.stderr == f"blkjobs: Could not open '{tmp_path / name}': {why}\n[]\n"
    import blkjobs.formats as formats
    from blkjobs import errors
    from blkjobs.formats import base as contract
    assert (formats.Driver, formats.Kind, formats.Mapping) == \
        (contract.Driver, contract.Kind, contract.Mapping)
    assert formats.NotAnImageFile is contract.NotAnImageFile is errors.NotAnImageFile
    assert formats.open_file is contract.open_file


def test_compare_imports_no_progress_meter(tmp_path):
    """compare without a progress output (-p, --progress-json,
    --progress-fd; or with -q) imports no progress meter (nor units under
    it); -p imports it. A SIGUSR1 pending as the compare starts is answered
    as before: one line on stderr, the compare carries on. The verdicts and
    statuses are qemu-img's."""
    a, b, c = tmp_path / "a.qcow2", tmp_path / "b.qcow2", tmp_path / "c.qcow2"
    qemu_img("create", "-f", "qcow2", a, "1M")
    qemu_io(a, "write -P 1 0 64k")
    qemu_img("convert", "-O", "qcow2", a, b)
    qemu_img("convert", "-O", "qcow2", a, c)
    qemu_io(c, "write -P 2 512k 4k")
    meter = ("blkjobs.cli.copy_progress", "blkjobs.units")
    for pending, opts, other, want_rc, want_out, want_mods in (
            (False, [], b, 0, "Images are identical.\n", "[]"),
            (False, ["-q"], b, 0, "", "[]"),
            (False, [], c, 1, "Content mismatch at offset 524288!\n", "[]"),
            (False, ["-p"], b, 0, None, str(list(meter))),
            (True, [], b, 0, "Images are identical.\n", str(list(meter)))):
        p = subprocess.run([sys.executable, "-c", USR1_PROBE, ",".join(meter),
                            "pending" if pending else "-", "compare", *opts, a, other],
                           capture_output=True, text=True, timeout=60)
        lines = p.stderr.splitlines()
        assert (p.returncode, lines[-1]) == (want_rc, want_mods), (pending, opts)
        # (the first update: 64 KiB of 1 MiB compared, as before)
        assert lines[:-1] == (["    (6.25/100%)"] if pending else []), (pending, opts, lines)
        if want_out is not None:
            assert p.stdout == want_out, (pending, opts)
        else:
            assert p.stdout.endswith("Images are identical.\n") and "(100.00/100%)" in p.stdout
        q = qemu_img("compare", *opts, a, other, check=False)
        assert q.returncode == want_rc and (want_out is None or q.stdout == want_out)


ATEXIT_PROBE = """
import os, sys
register, sys.argv = sys.argv[1] == "register", ["blkjobs"] + sys.argv[2:]
if register:        # a function registered before the command: it must run
    import atexit
    atexit.register(lambda: sys.stderr.write("[atexit ran]"))
import blkjobs.cli.main as cli
_exit = os._exit
def noted(rc):
    sys.stderr.write(f"[os._exit({rc}); atexit imported: {'atexit' in sys.modules}]")
    sys.stderr.flush()
    _exit(rc)
os._exit = noted
cli.run()
"""


def test_quick_exit_imports_no_atexit(tmp_path):
    """The quick exit (cli.main.run) does not import atexit to ask whether a
    function is registered: none can be without it. A plain convert, info,
    check and compare end by os._exit and never import it; a function
    registered before the command runs (the ordinary exit, no os._exit);
    the copy is the source's bytes."""
    src = tmp_path / "a.raw"
    src.write_bytes(b"\1" * 65536 + bytes(65536) + b"\2" * 4096)
    q = tmp_path / "a.qcow2"
    qemu_img("convert", "-O", "qcow2", src, q)
    for rc, args in ((0, ["convert", "-O", "raw", src, tmp_path / "o.raw"]),
                     (0, ["info", q]), (0, ["check", q]), (0, ["compare", q, q])):
        for register in (False, True):
            p = subprocess.run([sys.executable, "-c", ATEXIT_PROBE,
                                "register" if register else "-", *map(str, args)],
                               capture_output=True, text=True, timeout=60)
            want = "[atexit ran]" if register else f"[os._exit({rc}); atexit imported: False]"
            assert (p.returncode, p.stderr) == (rc, want), (args, register)
    assert qemu_img("compare", "-f", "raw", "-F", "raw", src, tmp_path / "o.raw").returncode == 0


GC_PROBE = """
import gc, sys
made = []
gc.callbacks.append(lambda phase, info: made.append(info["generation"]) if phase == "start" else None)
sys.argv = ["blkjobs"] + sys.argv[1:]
import blkjobs.cli.main as cli
before, n = gc.get_threshold(), len(made)     # (the interpreter's start made some)
rc = cli.main()
sys.stdout.flush()
print(f"collections {len(made) - n}; thresholds kept {gc.get_threshold() == before}; "
      f"callbacks {len(gc.callbacks)}", file=sys.stderr)
raise SystemExit(rc)
"""


def test_command_start_makes_no_collection(tmp_path):
    """The command's own imports (a qcow2 image's driver modules) make no
    garbage collection (main: 2-3 of the young objects, ~0.7 M
    instructions each): the first threshold is raised until the first
    collection, which puts the interpreter's back; main() leaves the
    thresholds and callbacks as they were. Outputs as qemu-img's."""
    src, top, a, b = _probe_images(tmp_path)
    for args, out in ((["info", a], f"image: {a}\n"),
                      (["map", "--output", "json", top], '[{ "start": 0,'),
                      (["check", a], "No errors were found on the image.\n"),
                      (["compare", a, b], "Images are identical.\n"),
                      (["convert", "-O", "qcow2", src, tmp_path / "o.qcow2"], ""),
                      (["convert", "-O", "raw", top, tmp_path / "c.raw"], "")):
        p = subprocess.run([sys.executable, "-c", GC_PROBE, *map(str, args)],
                           capture_output=True, text=True, timeout=60)
        assert (p.returncode, p.stderr) == \
            (0, "collections 0; thresholds kept True; callbacks 1\n"), args
        assert p.stdout.startswith(out), (args, p.stdout)
        if args[0] in ("info", "map", "check", "compare"):
            q = qemu_img(*args)
            assert p.stdout.split("\n")[0] == q.stdout.split("\n")[0], args
    assert qemu_img("compare", "-f", "raw", "-F", "qcow2", src, tmp_path / "o.qcow2").returncode == 0
    assert qemu_img("check", tmp_path / "o.qcow2").returncode == 0
    assert qemu_img("compare", top, tmp_path / "c.raw").returncode == 0


def test_deferred_collection_comes_and_restores_thresholds():
    """After the start, the first collection comes (cycles made by a long
    command are collected) and puts the interpreter's thresholds back."""
    import gc

    from blkjobs.cli import main as cli
    before = gc.get_threshold()
    cli._defer_collections()
    try:
        assert gc.get_threshold() == (cli._START_THRESHOLD, *before[1:])
        gc.collect()        # (the young generation empty: the count starts at 0)
        assert gc.get_threshold() == before
        cli._defer_collections()
        made = []
        gc.callbacks.append(lambda phase, info: made.append(phase))
        try:
            for _ in range(cli._START_THRESHOLD + 1000):
                cyc: list = []
                cyc.append(cyc)         # garbage only a collection frees
            assert "start" in made and gc.get_threshold() == before
        finally:
            gc.callbacks.pop()
    finally:
        cli._undefer_collections()
    assert gc.get_threshold() == before
