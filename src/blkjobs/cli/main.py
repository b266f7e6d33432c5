"""Entry point of the ``blkjobs`` command.

Error handling has one choke point: every :class:`BlkjobsError` (and the
OS errors of opening files) becomes one line on stderr and a non-zero exit
status; a traceback is only ever printed for a bug, with ``BLKJOBS_DEBUG=1``.
"""
from __future__ import annotations

import argparse
import gc
import importlib
import os
import signal
import sys

from .. import __version__
from ..errors import BlkjobsError, Terminated

PROG = "blkjobs"


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 1 like qemu-img
        sys.stderr.write(f"{self.prog}: {message}\n")
        sys.stderr.write(f"Try '{PROG} --help' for more information.\n")
        raise SystemExit(1)


def _command_modules() -> list[str]:
    import pkgutil
    pkg = sys.modules[__package__]
    return sorted(m.name for m in pkgutil.iter_modules(pkg.__path__) if m.name.startswith("cmd_"))


def _command_module(name: str):
    """The module of command ``name``, or None when there is none."""
    if not name.isidentifier():
        return None
    full = f"{__package__}.cmd_{name}"
    try:
        return importlib.import_module(full)
    except ModuleNotFoundError as e:
        if e.name == full:
            return None
        raise


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser. Module ``cmd_<name>`` defines command ``<name>``: when
    ``argv`` names a command only its module is imported (start-up time is
    part of every copy a user times); otherwise (help, typos) all are."""
    p = _Parser(prog=PROG, description="Block jobs and image tools with a C data path.")
    p.add_argument("-V", "--version", action="version", version=f"{PROG} {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    first = next((a for a in (argv or []) if not a.startswith("-")), None)
    mod = _command_module(first) if first is not None else None
    if mod is not None:
        mods = [mod]
    else:
        mods = [importlib.import_module(f"{__package__}.{name}") for name in _command_modules()]
    for mod in mods:
        mod.register(sub)
    return p


def _on_sigterm(signum, frame):
    raise Terminated


def main(argv: list[str] | None = None) -> int:
    if argv is not None:
        return _main(argv)
    # SIGTERM (a service manager, `timeout`, `kill`) unwinds like Ctrl-C:
    # jobs are cancelled, what they left is said, made files are removed.
    # `blkjobs serve` replaces it with its own orderly shutdown.
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return _main(sys.argv[1:])
    finally:
        # The process ends here: what is still alive goes with it. Frozen,
        # the interpreter's final collections do not walk it (~7 ms).
        gc.freeze()


def _main(argv: list[str]) -> int:
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return 1
    try:
        rc = args.func(args)
        return int(rc or 0)
    except BlkjobsError as e:
        sys.stderr.write(f"{PROG}: {e}\n")
        return getattr(e, "exit_code", 1)
    except OSError as e:
        where = f"'{e.filename}'" if e.filename else ""
        sys.stderr.write(f"{PROG}: {where + ': ' if where else ''}{e.strerror or e}\n")
        return 1
    except KeyboardInterrupt as e:
        # args: what became of the files, when the command knows (convert)
        how, code = ("terminated", 143) if isinstance(e, Terminated) else ("interrupted", 130)
        sys.stderr.write(f"{PROG}: {how}{': ' + str(e.args[0]) if e.args else ''}\n")
        return code
    except BrokenPipeError:  # pragma: no cover
        return 1
    except Exception:
        if os.environ.get("BLKJOBS_DEBUG"):
            raise
        import traceback
        sys.stderr.write(f"{PROG}: internal error: {traceback.format_exc().splitlines()[-1]}\n"
                         "(set BLKJOBS_DEBUG=1 for the traceback; please report it)\n")
        return 70


if __name__ == "__main__":
    raise SystemExit(main())
