"""What ``blkjobs COMMAND --help`` teaches beyond the options: an example per
command and its exit statuses (the epilog), and the help of the options and
operands whose registration gives none (the generic ``-f``, ``-q``, ``IMG``
... of each command). :func:`apply` puts them on the parser; the man page is
generated from it (``make man``)."""
from __future__ import annotations

import argparse

TYPE_CHECKING = False     # typing.TYPE_CHECKING without importing typing (start-up)
if TYPE_CHECKING:
    from typing import Any

_JOB_EXIT = ("0 the job completed, 1 it failed (or bad usage), 2 it was cancelled, "
             "130 Ctrl-C, 143 SIGTERM (both cancel the job and say what is in the files)")
_PLAIN_EXIT = "0 success, 1 error"
_COPY_EXIT = "0 success, 1 error, 130 Ctrl-C, 143 SIGTERM (a target it created is removed)"

#: command: (example lines, exit statuses)
EPILOGS: dict[str, tuple[tuple[str, ...], str]] = {
    "backup": (("blkjobs backup -p disk.qcow2 backup.qcow2",
                "blkjobs backup --sync incremental --bitmap b0 -B prev.qcow2 disk.qcow2 "
                "inc.qcow2"), _JOB_EXIT),
    "bench": (("blkjobs bench /var/tmp", "blkjobs bench --compare /var/tmp"), _PLAIN_EXIT),
    "bitmap": (("blkjobs bitmap --add disk.qcow2 b0",
                "blkjobs bitmap --merge b0 --clear disk.qcow2 b1"), _PLAIN_EXIT),
    "check": (("blkjobs check disk.qcow2", "blkjobs check -r leaks disk.qcow2"),
              "0 no errors, 1 the check could not complete, 2 corruptions, "
              "3 leaked clusters only, 63 the format has no checks (raw)"),
    "commit": (("blkjobs commit -p overlay.qcow2",
                "blkjobs commit -b base.qcow2 top.qcow2"), _JOB_EXIT),
    "compare": (("blkjobs compare disk.qcow2 copy.raw",
                 "blkjobs compare -q -s a.qcow2 b.qcow2 && echo same"),
                "0 identical, 1 different, 2 error"),
    "convert": (("blkjobs convert -p -O qcow2 disk.raw disk.qcow2",
                 "blkjobs convert -O qcow2 -B base.qcow2 -F qcow2 top.qcow2 new.qcow2"),
                _COPY_EXIT),
    "create": (("blkjobs create -f qcow2 disk.qcow2 10G",
                "blkjobs create -f qcow2 -b base.qcow2 -F qcow2 overlay.qcow2"), _PLAIN_EXIT),
    "dd": (("blkjobs dd -O qcow2 if=disk.raw of=head.qcow2 bs=1M count=64",),
           _PLAIN_EXIT),
    "demo": (("blkjobs demo /var/tmp/demo",), _PLAIN_EXIT),
    "info": (("blkjobs info --backing-chain overlay.qcow2",
              "blkjobs info --output json disk.qcow2"), _PLAIN_EXIT),
    "map": (("blkjobs map --output json overlay.qcow2",), _PLAIN_EXIT),
    "measure": (("blkjobs measure -O qcow2 disk.raw",
                 "blkjobs measure -O qcow2 --size 10G --output json"), _PLAIN_EXIT),
    "mirror": (("blkjobs mirror -p disk.qcow2 copy.qcow2",), _JOB_EXIT),
    "rebase": (("blkjobs rebase -b new-base.qcow2 -F qcow2 overlay.qcow2",
                'blkjobs rebase -b "" overlay.qcow2   # standalone'), _PLAIN_EXIT),
    "resize": (("blkjobs resize disk.qcow2 +1G",
                "blkjobs resize --shrink disk.raw 512M"), _PLAIN_EXIT),
    "serve": (("blkjobs serve --socket /run/blkjobs.sock",), "0 shut down cleanly, 1 error"),
    "snapshot": (("blkjobs snapshot -l disk.qcow2",
                  "blkjobs snapshot -c before-upgrade disk.qcow2"), _PLAIN_EXIT),
    "amend": (("blkjobs amend -o compat=0.10 disk.qcow2",
               "blkjobs amend -o lazy_refcounts=on disk.qcow2"), _PLAIN_EXIT),
    "stream": (("blkjobs stream -p overlay.qcow2",
                "blkjobs stream -b mid.qcow2 top.qcow2"), _JOB_EXIT),
}

_F = "format of the image (raw, qcow2; probed when not given)"
_Q = "quiet: no output but errors"
_U = "force share: open an image another process is writing (read only)"
_OUT = "output format: human (qemu-img's text) or json"
_ERR = "what an I/O error does to the job: report (fail), ignore, stop, enospc, auto"
_IMG = "the image (a file name)"

#: (command, first option string or dest): help
OPTION_HELP: dict[tuple[str, str], str] = {
    ("backup", "--sync"): "what to copy: full, top (the top image's data), none "
                          "(only what the guest overwrites), bitmap, incremental",
    ("backup", "--on-source-error"): _ERR + " (reading the source)",
    ("backup", "--on-target-error"): _ERR + " (writing the target)",
    ("backup", "src"): "the image to back up", ("backup", "target"): "the backup image",
    ("bitmap", "-b"): "with --merge: the image holding the source bitmap",
    ("bitmap", "-F"): "format of -b's image", ("bitmap", "-f"): _F,
    ("bitmap", "args"): "IMG BITMAP: the image and the bitmap's name",
    ("check", "-f"): _F, ("check", "--output"): _OUT, ("check", "-q"): _Q,
    ("check", "image"): _IMG,
    ("commit", "-f"): _F, ("commit", "image"): "the overlay whose data is committed",
    ("compare", "-f"): "format of the first image (probed)",
    ("compare", "-F"): "format of the second image (probed)",
    ("compare", "a"): "the first image", ("compare", "b"): "the second image",
    ("convert", "src"): "the source image", ("convert", "dst"): "the target image",
    ("create", "image"): "the new image",
    ("create", "size"): "its size (e.g. 10G; from the backing file when omitted)",
    ("dd", "-U"): _U, ("dd", "operands"): "if=IN of=OUT [bs=N] [count=N] [skip=N]",
    ("info", "-f"): _F, ("info", "--output"): _OUT, ("info", "image"): _IMG,
    ("map", "-f"): _F, ("map", "--output"): _OUT,
    ("map", "-s"): "map from this guest offset", ("map", "-l"): "map at most this many bytes",
    ("map", "image"): _IMG,
    ("measure", "--output"): _OUT, ("measure", "--size"): "measure a new image of this size",
    ("measure", "-U"): _U, ("measure", "images"): "the image to measure",
    ("mirror", "-f"): _F, ("mirror", "-O"): "format of the target (default: the source's)",
    ("mirror", "--sync"): "what to copy: full, top or none",
    ("mirror", "--granularity"): "dirty tracking granularity in bytes (power of 2)",
    ("mirror", "--buf-size"): "bytes copied in flight at most",
    ("mirror", "--copy-mode"): "background (copy dirty areas) or write-blocking "
                               "(guest writes go to both)",
    ("mirror", "--on-source-error"): _ERR + " (reading the source)",
    ("mirror", "--on-target-error"): _ERR + " (writing the target)",
    ("mirror", "src"): "the image to mirror", ("mirror", "target"): "the mirror image",
    ("rebase", "-f"): _F, ("rebase", "image"): "the overlay to rebase",
    ("resize", "-f"): _F, ("resize", "-q"): _Q, ("resize", "args"): "IMG [+|-]SIZE",
    ("snapshot", "-f"): _F, ("snapshot", "-q"): _Q, ("snapshot", "-U"): _U,
    ("snapshot", "images"): "[SNAPSHOT] IMG",
    ("amend", "-o"): "options to change: compat=0.10|1.1, lazy_refcounts=on|off, "
    "refcount_bits=N, size=N (-o help lists them); may repeat",
    ("amend", "-f"): _F, ("amend", "-q"): _Q, ("amend", "-p"): "show progress (qemu-img's lines)",
    ("amend", "--force"): "accepted for qemu-img's command lines (nothing here needs it)",
    ("amend", "args"): "IMG",
    ("stream", "-f"): _F, ("stream", "--on-error"): _ERR, ("stream", "image"): _IMG,
}

TOP_EPILOG = ("exit status: 0 success, 1 error or bad usage; some commands say more "
              "(blkjobs COMMAND --help). Ctrl-C exits 130, SIGTERM 143.\n"
              "example: blkjobs convert -p -O qcow2 disk.raw disk.qcow2")


def _keeping_lines(base: Any) -> Any:
    """``base`` (the parser's formatter), keeping text with line breaks (the
    epilogs' examples) as written; a paragraph is wrapped as before."""
    class Formatter(base):
        def _fill_text(self, text, width, indent):
            if "\n" in text:
                return "".join(indent + line for line in text.splitlines(keepends=True))
            return super()._fill_text(text, width, indent)
    return Formatter


def apply(parser: argparse.ArgumentParser, sub) -> None:
    """Epilogs (examples, exit statuses) and the missing option help."""
    parser.epilog = TOP_EPILOG
    parser.formatter_class = _keeping_lines(parser.formatter_class)
    for name, p in sub.choices.items():
        ex = EPILOGS.get(name)
        if ex is not None:
            lines, codes = ex
            p.epilog = "examples:\n" + "".join(f"  {x}\n" for x in lines) + \
                f"\nexit status: {codes}"
            p.formatter_class = _keeping_lines(p.formatter_class)
        for a in p._actions:
            if a.help or isinstance(a, argparse._HelpAction):
                continue
            key = a.option_strings[0] if a.option_strings else a.dest
            a.help = OPTION_HELP.get((name, key))


def command_parser(parser: argparse.ArgumentParser, args) -> argparse.ArgumentParser:
    """The parser of the command ``args`` ran (the top one when none)."""
    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction) and getattr(args, "command", None):
            return a.choices.get(args.command, parser)
    return parser


def usage_error(parser: argparse.ArgumentParser, message: str) -> None:
    """A usage error: the command's usage, one line saying what is wrong
    (with 'did you mean' for a mistyped command), where to read more; exit 1."""
    import difflib
    import sys
    prog = parser.prog.split()[0]
    if message.startswith("argument COMMAND: invalid choice: "):
        word = message.split("'")[1] if "'" in message else ""
        choices = [c for a in parser._actions if isinstance(a, argparse._SubParsersAction)
                   for c in a.choices]
        close = difflib.get_close_matches(word, choices, n=1)
        message = f"unknown command '{word}'" + (f"; did you mean '{close[0]}'?" if close
                                                  else "")
        sys.stderr.write(f"{parser.prog}: {message}\n"
                         f"Try '{prog} --help' for the list of commands.\n")
        raise SystemExit(1)
    # a command's parser: its own usage first -- but not under another name
    # (a qemu-img symlink): scripts and QEMU's tests expect qemu-img's lines
    if parser.prog != prog and prog == "blkjobs":
        parser.print_usage(sys.stderr)
    sys.stderr.write(f"{parser.prog}: {message}\n"
                     f"Try '{parser.prog} --help' for more information.\n")
    raise SystemExit(1)
