"""The command line of the commands that start every copy and every look
(``convert``, ``info``, ``map``, ``check``, ``compare``) read without
argparse when it is plain: argparse's import (with gettext and locale), the
parser's construction and its parse cost ~8-10 ms of CPU, a fifth of such a
command's start-up.

Plain: the command first (no global option), then only options that
:mod:`.quickparse_table` knows -- each spelt in full, its value (if it takes
one) the next argument or after ``=`` for a long option, a value that does
not start with ``-`` and is one of the choices when there are some -- and
as many operands as the command takes. Anything else (help, an unknown,
abbreviated or bundled option, ``--``, an option argparse converts or acts
on itself such as ``-o``, a usage error) returns None and argparse parses
the command line as before: its help and its errors are argparse's, word
for word. What comes back is what argparse's parse gives (the same names,
values and defaults: tests/test_quickparse.py compares them).

The table is generated from the parsers (``make man``, or ``python -m
blkjobs.cli.quickparse_gen``); tests/test_quickparse.py fails when it is
stale.
"""
from __future__ import annotations

from .quickparse_table import COMMANDS, TOP_DEFAULTS

TYPE_CHECKING = False     # typing.TYPE_CHECKING without importing typing (start-up)
if TYPE_CHECKING:
    from typing import Any


class Namespace:
    """argparse.Namespace's behaviour (attributes, equality, ``in``, repr)
    without importing argparse."""

    def __init__(self, **kwargs: Any) -> None:
        for k, v in kwargs.items():
            setattr(self, k, v)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Namespace):
            return NotImplemented
        return vars(self) == vars(other)

    __hash__ = None     # type: ignore[assignment]  # as argparse's

    def __contains__(self, key: str) -> bool:
        return key in self.__dict__

    def __repr__(self) -> str:
        return "Namespace(" + ", ".join(f"{k}={v!r}" for k, v in vars(self).items()) + ")"


def parse(argv: list[str]) -> Namespace | None:
    """The parsed command line, or None when argparse must read it."""
    if not argv or argv[0] not in COMMANDS:
        return None
    name = argv[0]
    spec = COMMANDS[name]
    opts: dict[str, Any] = spec["options"]
    values: dict[str, Any] = {}
    operands: list[str] = []
    i, n = 1, len(argv)
    while i < n:
        a = argv[i]
        i += 1
        if not a.startswith("-"):
            operands.append(a)
            continue
        value = None
        if a.startswith("--") and "=" in a:
            a, _, value = a.partition("=")
        o = opts.get(a)
        if o is None:           # unknown, abbreviated, bundled, `--`, `-`, help, ...
            return None
        dest, kind, choices = o
        if kind == "store_true":
            if value is not None:
                return None
            values[dest] = True
            continue
        if value is None:
            if i == n or argv[i].startswith("-"):
                return None
            value = argv[i]
            i += 1
        if choices is not None and value not in choices:
            return None
        if kind == "store":
            values[dest] = value
        elif kind == "append":
            values[dest] = [*(values.get(dest) or spec["defaults"].get(dest) or []), value]
        else:
            return None
    pos = spec["operands"]
    fixed = sum(1 for _, nargs in pos if nargs is None)
    var = len(operands) - fixed
    if var < 0 or (var == 0 and any(nargs == "+" for _, nargs in pos)) or \
            (var > 0 and all(nargs is None for _, nargs in pos)):
        return None
    at = 0
    for dest, nargs in pos:
        if nargs is None:
            values[dest] = operands[at]
            at += 1
        else:                   # "+": what the fixed operands leave
            values[dest] = operands[at:at + var]
            at += var
    ns = Namespace(**TOP_DEFAULTS, **{k: list(v) if isinstance(v, list) else v
                                      for k, v in spec["defaults"].items()})
    for k, v in values.items():
        setattr(ns, k, v)
    module, _, func = spec["func"].partition(":")
    setattr(ns, "command", name)    # noqa: B010  (not an attribute mypy knows)
    setattr(ns, "func", getattr(_module(module), func))  # noqa: B010
    return ns


def _module(name: str) -> Any:
    """The command's module. The five commands read here are imported by
    plain import statements: ``importlib`` (with ``warnings`` under it,
    1.5 M instructions) is imported by none of them otherwise."""
    if name == f"{__package__}.cmd_convert":
        from . import cmd_convert as m
    elif name == f"{__package__}.cmd_info":
        from . import cmd_info as m     # type: ignore[no-redef]
    elif name == f"{__package__}.cmd_map":
        from . import cmd_map as m      # type: ignore[no-redef]
    elif name == f"{__package__}.cmd_check":
        from . import cmd_check as m    # type: ignore[no-redef]
    elif name == f"{__package__}.cmd_compare":
        from . import cmd_compare as m  # type: ignore[no-redef]
    else:                               # a command the table gained since
        import importlib
        return importlib.import_module(name)
    return m
