# PYTHON_ARGCOMPLETE_OK  (shell completion: argcomplete looks for this line)
"""Entry point of the ``blkjobs`` command.

Error handling has one choke point: every :class:`BlkjobsError` (and the
OS errors of opening files) becomes one line on stderr and its class's
``exit_code``; a traceback is only ever printed for a bug, with
``BLKJOBS_DEBUG=1``. A reader that goes away (``blkjobs map ... | head``)
ends the command quietly with status 0, as qemu-img does.

Logging: the modules log to ``blkjobs.<module>`` loggers (the daemon's
monitors to ``blkjobs.daemon.monitor.<n>``). The global options ``-v``
(info; ``-vv`` debug) and ``--log-level LEVEL`` (also after ``serve``) send them to stderr; by
default only warnings are shown, and a normal run logs none.
"""
from __future__ import annotations

import gc
import os
import sys

from .. import __version__
from ..errors import (BlkjobsError, InternalError, Terminated, UsageError, note_stop,
                      raise_pending_stop, take_stop)
from . import progname, set_progname

TYPE_CHECKING = False      # typing costs 10 ms to import: not for --version
if TYPE_CHECKING:
    import argparse
    from typing import Any

PROG = "blkjobs"
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
#: Global options that take a value (skipped when looking for the command).
_VALUED = ("--log-level", "--error-format")


def _parser_class() -> type[argparse.ArgumentParser]:
    """argparse is imported here, not at start-up: ``--version`` skips it
    (with ``re`` and ``enum`` under it: most of its start-up time)."""
    import argparse

    class _Formatter(argparse.HelpFormatter):
        """argparse's, with the terminal width found without importing
        shutil (and bz2, lzma under it) on every start: argparse builds a
        formatter for each add_argument."""
        def __init__(self, prog, indent_increment=2, max_help_position=24, width=None):
            if width is None:
                width = _columns() - 2
            super().__init__(prog, indent_increment, max_help_position, width)

    class _Parser(argparse.ArgumentParser):
        def __init__(self, *args, **kw):
            kw.setdefault("formatter_class", _Formatter)
            super().__init__(*args, **kw)

        _intermixing = False

        def error(self, message):  # exit 1 like qemu-img
            from .help_texts import usage_error
            from .opts_help import operands_missing
            operands_missing(self, message)     # `-o help` needs no operands
            usage_error(self, message)

        def parse_args(self, args=None, namespace=None):
            ns, extra = self.parse_known_args(args, namespace)
            if extra:       # said by the command's own parser: its usage
                from .help_texts import command_parser
                command_parser(self, ns).error(f"unrecognized arguments: {' '.join(extra)}")
            return ns

        def parse_known_args(self, args=None, namespace=None):
            """A command's options may follow its operands, as qemu-img's getopt
            permutes them (``create -f qcow2 IMG -F qcow2 SIZE``)."""
            if self._intermixing or self._subparsers is not None:
                return super().parse_known_args(args, namespace)
            self._intermixing = True
            try:
                return self.parse_known_intermixed_args(args, namespace)
            except TypeError:      # a command whose operands argparse cannot intermix
                return super().parse_known_args(args, namespace)
            finally:
                self._intermixing = False
    return _Parser


def _columns() -> int:
    """shutil.get_terminal_size().columns: $COLUMNS, else stdout's terminal,
    else 80."""
    try:
        columns = int(os.environ["COLUMNS"])
    except (KeyError, ValueError):
        columns = 0
    if columns <= 0:
        try:
            columns = os.get_terminal_size(sys.__stdout__.fileno()).columns  # type: ignore[union-attr]
        except (AttributeError, ValueError, OSError):
            columns = 0
    return columns or 80


def _command_modules() -> list[str]:
    import pkgutil
    pkg = sys.modules[__package__]
    return sorted(m.name for m in pkgutil.iter_modules(pkg.__path__) if m.name.startswith("cmd_"))


def _command_module(name: str):
    """The module of command ``name``, or None when there is none."""
    if not name.isidentifier():
        return None
    import importlib
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
    import importlib
    _Parser = _parser_class()
    p = _Parser(prog=progname(), description="Block jobs and image tools with a C data path.")
    p.add_argument("-V", "--version", action="version", version=f"{progname()} {__version__}")
    add_log_options(p, default=0)
    p.add_argument("--error-format", choices=["line", "json"], default="line",
                   help="an error as qemu-img's one line (default) or as one JSON object "
                   "on stderr: class, exit-code, errno, side, offset, path, message")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    first = _first_word(argv or [])
    mod = _command_module(first) if first is not None else None
    if mod is not None:
        mods = [mod]
    elif first is None and any(a in ("-V", "--version") for a in argv or []):
        mods = []      # --version needs no command
    else:
        mods = [importlib.import_module(f"{__package__}.{name}") for name in _command_modules()]
    for mod in mods:
        mod.register(sub)
    from .help_texts import apply
    apply(p, sub)
    return p


#: stands for argparse.SUPPRESS (argparse is not imported at start-up, and
#: argparse compares its SUPPRESS by identity)
_SUPPRESS = object()


def add_log_options(p: argparse.ArgumentParser, default: object = _SUPPRESS) -> None:
    """``-v``/``--verbose`` (repeatable) and ``--log-level LEVEL``: global
    options, and a command's too (``blkjobs serve -v``; there the default
    SUPPRESS leaves the global value alone when the command's is not given)."""
    import argparse
    if default is _SUPPRESS:
        default = argparse.SUPPRESS
    p.add_argument("-v", "--verbose", action="count", default=default,
                   help="log to stderr: -v info, -vv debug (default: warnings only)")
    p.add_argument("--log-level", type=str.lower, choices=LOG_LEVELS, metavar="LEVEL",
                   default=None if default == 0 else default,
                   help="log messages of LEVEL and above to stderr: " + ", ".join(LOG_LEVELS))


def _first_word(argv: list[str]) -> str | None:
    """The first argument that is not an option or a global option's value."""
    skip = False
    for a in argv:
        if skip:
            skip = False
        elif a in _VALUED:
            skip = True
        elif not a.startswith("-"):
            return a
    return None


def _setup_logging(verbose: int, level: str | None) -> None:
    """A stderr handler on the ``blkjobs`` logger: ``level``, else by the
    count of ``-v``, else warnings. ``logging`` costs milliseconds to import;
    without options and when nothing imported it yet, it is left alone:
    logging's last-resort handler shows warnings (only) on stderr too."""
    if not verbose and level is None and "logging" not in sys.modules:
        return
    import logging
    if level is None:
        level = ("warning", "info", "debug")[min(verbose, 2)]
    log = logging.getLogger(PROG)
    for h in list(log.handlers):           # main() run twice in one process (tests)
        if getattr(h, "_blkjobs_cli", False):
            log.removeHandler(h)

    class Stderr(logging.StreamHandler):
        """Writes to the sys.stderr of the moment (as logging.lastResort)."""
        _blkjobs_cli = True

        @property
        def stream(self):
            return sys.stderr

        @stream.setter
        def stream(self, value):
            pass

    h = Stderr()
    h.setFormatter(logging.Formatter(f"{progname()}: %(levelname)s: %(name)s: %(message)s"))
    log.addHandler(h)
    log.setLevel(getattr(logging, level.upper()))


def _apply_cache_modes(args: Any) -> None:
    """``-t``/``-T`` (:mod:`.cache_mode`, which only adds them to a parser:
    not imported here, start-up time): checked with qemu-img's texts, then
    the open flags set."""
    from ..formats import cache
    has_t, has_T = args._cache_sides
    dst = src = None
    if has_t:
        if args.cache not in cache.MODES:
            raise UsageError(f"Invalid cache option: {args.cache}")
        dst = args.cache
    if has_T:
        if args.src_cache not in cache.MODES:
            raise UsageError(f"Invalid source cache option: {args.src_cache}")
        src = args.src_cache
    cache.set_cli_modes(src=src or dst, dst=dst or src)


def _blkdebug(inner: Any, opts: dict[str, Any]) -> Any:
    """The job layer's ``blkdebug`` filter over ``inner``, for the names
    that ask for one (``blkdebug:``, ``json:``, option strings; backing
    names too): :func:`.image_opts.blkdebug_filter`, imported then."""
    from .image_opts import blkdebug_filter
    return blkdebug_filter(inner, opts)


def _on_sigterm(signum, frame):
    note_stop(15)
    raise Terminated


def _on_sigint(signum, frame):
    note_stop(2)
    raise KeyboardInterrupt


def run() -> None:
    """The ``blkjobs`` command (the console script, ``python -m blkjobs``):
    :func:`main`, then the process ends with its status at once when the
    interpreter's own exit has nothing left to do that anyone could see
    (:func:`_quick_exit_ok`) -- it would free every object and module one by
    one (~4 M instructions, more than a ms of CPU; under load twice that in
    wall time, after the copy is done). Otherwise, as before: SystemExit."""
    rc = main()
    if _quick_exit_ok():
        os._exit(rc)
    raise SystemExit(rc)


def _quick_exit_ok() -> bool:
    """Whether ending the process now (os._exit) skips nothing: stdout and
    stderr flushed (their buffers are the only Python-side writes still
    pending: --progress-fd's stream flushes each line; image files are
    written by pwrite or the C engine, and what a cache mode makes durable
    was synced before the command returned), no thread the interpreter
    would wait for, no atexit handler (logging's, weakref.finalize's,
    multiprocessing's; concurrent.futures' threading._register_atexit),
    and no NBD client connection (freeing it says goodbye to the server:
    NBD_CMD_DISC). The kernel closes the files and releases their locks, as
    for any exit."""
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except (OSError, ValueError):       # the ordinary exit reports it as it does
        return False
    if "threading" in sys.modules:
        import threading
        main_thread = threading.main_thread()
        if any(t is not main_thread and not t.daemon for t in threading.enumerate()):
            return False
        if getattr(threading, "_threading_atexits", None):     # concurrent.futures'
            return False
    # a function is registered through the atexit module: never imported,
    # none was (not imported here only to ask: ~0.1 M instructions)
    atexit = sys.modules.get("atexit")
    if atexit is not None:
        ncallbacks = getattr(atexit, "_ncallbacks", None)
        if ncallbacks is None or ncallbacks():
            return False
    return "blkjobs.native.nbd" not in sys.modules


def main(argv: list[str] | None = None) -> int:
    if argv is not None:
        return _main(argv)
    # Start-up (imports, the parser) makes tens of thousands of objects and
    # no garbage cycles worth a collection: the collector is off until the
    # command runs (_main), then the objects of start-up are frozen out of
    # its walks (a raw -> raw convert: its collections were ~4% of the
    # CPU of start-up).
    gc.disable()
    try:
        return _main_process()
    finally:
        gc.enable()     # (already, once the command ran; main() may be called in-process)
        _undefer_collections()


#: the collector's first threshold while the command starts: a command on a
#: qcow2 image imports its driver's modules itself (after start-up), ~2 000
#: new objects and no garbage, which at the interpreter's 700 made 2-3
#: collections of them (~0.7 M instructions each). The first collection
#: puts the interpreter's thresholds back: cycles made by a long command
#: are collected as before, after at most this many more container objects.
_START_THRESHOLD = 25_000
#: (the interpreter's thresholds, the gc callback) while deferred
_deferred: list = []


def _defer_collections() -> None:
    """The first collection after :data:`_START_THRESHOLD` allocations, then
    the usual thresholds."""
    old = gc.get_threshold()

    def first(phase: str, info: dict) -> None:
        gc.set_threshold(*old)      # (in the collection: it goes on as it was)

    gc.set_threshold(_START_THRESHOLD, *old[1:])
    gc.callbacks.append(first)
    _deferred[:] = [old, first]


def _undefer_collections() -> None:
    """The thresholds and callbacks as before :func:`_defer_collections`
    (main() returns: a process that goes on, e.g. tests, keeps its own)."""
    if _deferred:
        old, first = _deferred
        _deferred.clear()
        if first in gc.callbacks:
            gc.callbacks.remove(first)
        gc.set_threshold(*old)


def _main_process() -> int:
    set_progname(sys.argv[0])
    if sys.argv[1:] in (["--version"], ["-V"]):
        # what argparse's version action prints, without importing argparse
        # (nor setting up the signals below)
        sys.stdout.write(f"{progname()} {__version__}\n")
        return 0
    # _signal, not signal: the same calls without the enums signal builds
    # (with enum, functools and collections under it: ~5 ms of start-up)
    if TYPE_CHECKING:
        import signal as _signal
    else:
        import _signal
    # Then: SIGUSR1 (a progress line, please) never ends a command. Held
    # blocked here and in every thread made later, as qemu-img does; the
    # commands with a progress meter take it (copy_progress.take_sigusr1).
    _signal.pthread_sigmask(_signal.SIG_BLOCK, {_signal.SIGUSR1})
    # SIGTERM (a service manager, `timeout`, `kill`) unwinds like Ctrl-C:
    # jobs are cancelled, what they left is said, made files are removed.
    # `blkjobs serve` replaces it with its own orderly shutdown.
    _signal.signal(_signal.SIGTERM, _on_sigterm)
    # Ctrl-C as Python's own handler, but noted (errors.note_stop): one that
    # lands in a finalizer, which drops it, is raised again later.
    if _signal.getsignal(_signal.SIGINT) is _signal.default_int_handler:
        _signal.signal(_signal.SIGINT, _on_sigint)
    try:
        return _main(sys.argv[1:])
    finally:
        # The process ends here: what is still alive goes with it. Frozen,
        # the interpreter's final collections do not walk it (~7 ms).
        gc.freeze()


def _main(argv: list[str]) -> int:
    prog = progname()
    args: Any = None
    if "_ARGCOMPLETE" not in os.environ:
        # a plain convert, info, map, check or compare: read without argparse
        # (~8-10 ms of start-up); anything else (help, errors) is argparse's
        from .quickparse import parse as quick_parse
        args = quick_parse(argv)
    if args is None:
        args = _parse(argv)
        if args is None:
            return 1
    _setup_logging(args.verbose, args.log_level)
    try:
        if hasattr(args, "_image_operands"):      # --image-opts, --object
            from ..formats import register_filter
            register_filter("blkdebug", _blkdebug)
            if getattr(args, "object", None) or getattr(args, "image_opts", False):
                # (else it has nothing to do: not imported, start-up time)
                from .image_opts import apply
                apply(args)
        if hasattr(args, "_cache_sides"):         # -t / -T
            _apply_cache_modes(args)
        if not gc.isenabled():      # main(): off for start-up (see there)
            gc.freeze()
            _defer_collections()    # and the command's own imports
            gc.enable()
        rc = args.func(args)
        # a Ctrl-C or SIGTERM that a finalizer dropped, after the last check
        raise_pending_stop("it came as the command ended: what it did is complete")
        sys.stdout.flush()     # a closed pipe is noticed here, not at exit
        return int(rc or 0)
    except InternalError as e:
        if os.environ.get("BLKJOBS_DEBUG"):
            raise
        _log_traceback()
        sys.stderr.write(f"{prog}: internal error: {e}\n"
                         "(set BLKJOBS_DEBUG=1 for the traceback; please report it)\n")
        return e.exit_code
    except BlkjobsError as e:
        from .error_json import print_if_json
        if not print_if_json(args, e, e.exit_code):
            sys.stderr.write(f"{prog}: {_named(str(e), prog)}\n")
        return e.exit_code
    except BrokenPipeError:
        # The reader went away (`| head`): stop quietly and exit 0 as
        # qemu-img does. What is still buffered for stdout goes nowhere, so
        # the interpreter's final flush cannot fail and print a warning.
        _stdout_to_devnull()
        return 0
    except OSError as e:
        where = f"'{e.filename}'" if e.filename else ""
        from .error_json import print_if_json
        if not print_if_json(args, e, 1):
            sys.stderr.write(f"{prog}: {where + ': ' if where else ''}{e.strerror or e}\n")
        return 1
    except KeyboardInterrupt as e:
        take_stop()
        if prog == "qemu-img":      # qemu-img dies of the signal, saying nothing
            _die_of(15 if isinstance(e, Terminated) else 2)     # SIGTERM, SIGINT
        # args: what became of the files, when the command knows (convert)
        how, code = ("terminated", 143) if isinstance(e, Terminated) else ("interrupted", 130)
        sys.stderr.write(f"{prog}: {how}{': ' + str(e.args[0]) if e.args else ''}\n")
        return code
    except Exception:
        if os.environ.get("BLKJOBS_DEBUG"):
            raise
        _log_traceback()
        import traceback
        sys.stderr.write(f"{prog}: internal error: {traceback.format_exc().splitlines()[-1]}\n"
                         "(set BLKJOBS_DEBUG=1 for the traceback; please report it)\n")
        return 70


def _parse(argv: list[str]) -> Any:
    """The command line through argparse (None: no command; the help was
    printed)."""
    parser = build_parser(argv)
    if "_ARGCOMPLETE" in os.environ:      # the shell asks for completions
        import argcomplete
        argcomplete.autocomplete(parser)  # prints them and exits
    from .opts_help import OptionsHelp
    try:
        args = parser.parse_args(argv)
    except OptionsHelp as e:        # `create -f qcow2 -o help`: the command lists them
        args = e.args_ns
        for a in parser._actions:   # the global options' defaults
            if not hasattr(args, a.dest) and a.default != "==SUPPRESS==":
                setattr(args, a.dest, a.default)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return None
    return args


def _die_of(sig: int) -> None:
    """End the process by ``sig``'s default action (what was unwound is
    done: a convert's target is closed and kept, as qemu-img leaves it)."""
    import signal
    try:
        sys.stdout.flush()
    except (OSError, ValueError):
        pass
    signal.signal(sig, signal.SIG_DFL)
    os.kill(os.getpid(), sig)


def _log_traceback() -> None:
    """The traceback of the bug being handled, at debug level (``-vv``)."""
    if "logging" in sys.modules:        # else no -v: nothing would show it
        import logging
        logging.getLogger(__name__).debug("internal error", exc_info=True)


def _named(text: str, prog: str) -> str:
    """A message's continuation lines start with the program's name too."""
    return text.replace("\nblkjobs: ", f"\n{prog}: ") if prog != "blkjobs" else text


def _stdout_to_devnull() -> None:
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):   # replaced by a test harness
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)


if __name__ == "__main__":
    run()
