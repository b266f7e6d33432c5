"""The command line of the commands that start every copy and every look
(``convert``, ``info``, ``map``, ``check``, ``compare``) read without
argparse when it is plain: argparse's import (with gettext and locale), the
parser's construction and its parse cost ~8-10 ms of CPU, a fifth of such a
command's start-up.

Plain: the command first (no global option), then only options that
the table at the end of this module knows -- each spelt in full, its value (if it takes
one) the next argument or after ``=`` for a long option, a value that does
not start with ``-`` and is one of the choices when there are some -- and
as many operands as the command takes. Anything else (help, an unknown,
abbreviated or bundled option, ``--``, an option argparse converts or acts
on itself such as ``-o``, a usage error) returns None and argparse parses
the command line as before: its help and its errors are argparse's, word
for word. What comes back is what argparse's parse gives (the same names,
values and defaults: tests/test_quickparse.py compares them).

The table is generated from the parsers (``make man``, or ``python -m
blkjobs.cli.quickparse_gen``, which rewrites what follows its mark at the
end of this module); tests/test_quickparse.py fails when it is stale.
"""
from __future__ import annotations

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


# -- Generated by ``python -m blkjobs.cli.quickparse_gen`` from the parsers: do not edit
# below (tests/test_quickparse.py checks it is current).

TOP_DEFAULTS: dict[str, Any]
TOP_DEFAULTS = {'command': None, 'error_format': 'line', 'log_level': None, 'verbose': 0}

COMMANDS: dict[str, dict[str, Any]]
COMMANDS = {'check': {'defaults': {'_cache_sides': (False, True),
                        '_image_fmts': ('fmt',),
                        '_image_operands': ('image',),
                        'fmt': None,
                        'force_share': False,
                        'image_opts': False,
                        'object': [],
                        'output': 'human',
                        'quiet': False,
                        'repair': None,
                        'src_cache': 'writeback'},
           'func': 'blkjobs.cli.cmd_check:run',
           'operands': (('image', None),),
           'options': {'--force-share': ('force_share', 'store_true', None),
                       '--image-opts': ('image_opts', 'store_true', None),
                       '--object': ('object', 'append', None),
                       '--output': ('output', 'store', ('human', 'json')),
                       '-T': ('src_cache', 'store', None),
                       '-U': ('force_share', 'store_true', None),
                       '-f': ('fmt', 'store', None),
                       '-q': ('quiet', 'store_true', None),
                       '-r': ('repair', 'store', ('leaks', 'all'))}},
 'compare': {'defaults': {'_cache_sides': (False, True),
                          '_image_fmts': ('fmt_a', 'fmt_b'),
                          '_image_operands': ('a', 'b'),
                          'fmt_a': None,
                          'fmt_b': None,
                          'force_share': False,
                          'image_opts': False,
                          'object': [],
                          'progress': False,
                          'progress_fd': None,
                          'progress_json': False,
                          'quiet': False,
                          'src_cache': 'writeback',
                          'strict': False},
             'func': 'blkjobs.cli.cmd_compare:run',
             'operands': (('a', None), ('b', None)),
             'options': {'--force-share': ('force_share', 'store_true', None),
                         '--image-opts': ('image_opts', 'store_true', None),
                         '--object': ('object', 'append', None),
                         '--progress-json': ('progress_json',
                                             'store_true',
                                             None),
                         '-F': ('fmt_b', 'store', None),
                         '-T': ('src_cache', 'store', None),
                         '-U': ('force_share', 'store_true', None),
                         '-f': ('fmt_a', 'store', None),
                         '-p': ('progress', 'store_true', None),
                         '-q': ('quiet', 'store_true', None),
                         '-s': ('strict', 'store_true', None)}},
 'convert': {'defaults': {'_cache_sides': (True, True),
                          '_image_fmts': ('src_fmt',),
                          '_image_operands': ('srcs',),
                          'backing': None,
                          'backing_fmt': None,
                          'bitmaps': False,
                          'cache': 'unsafe',
                          'compress': False,
                          'copy_range': False,
                          'dst_fmt': 'raw',
                          'force_share': False,
                          'image_opts': False,
                          'no_create': False,
                          'objects': None,
                          'options': None,
                          'out_of_order': False,
                          'progress': False,
                          'progress_fd': None,
                          'progress_json': False,
                          'quiet': False,
                          'rate': '0',
                          'request_size': None,
                          'salvage': False,
                          'skip_broken_bitmaps': False,
                          'snapshot': None,
                          'sparse': None,
                          'src_cache': 'writeback',
                          'src_fmt': None,
                          'target_is_zero': False,
                          'threads': None},
             'func': 'blkjobs.cli.cmd_convert:run',
             'operands': (('srcs', '+'), ('dst', None)),
             'options': {'--bitmaps': ('bitmaps', 'store_true', None),
                         '--force-share': ('force_share', 'store_true', None),
                         '--image-opts': ('image_opts', 'store_true', None),
                         '--object': ('objects', 'append', None),
                         '--progress-json': ('progress_json',
                                             'store_true',
                                             None),
                         '--request-size': ('request_size', 'store', None),
                         '--salvage': ('salvage', 'store_true', None),
                         '--skip-broken-bitmaps': ('skip_broken_bitmaps',
                                                   'store_true',
                                                   None),
                         '--target-is-zero': ('target_is_zero',
                                              'store_true',
                                              None),
                         '-B': ('backing', 'store', None),
                         '-C': ('copy_range', 'store_true', None),
                         '-F': ('backing_fmt', 'store', None),
                         '-O': ('dst_fmt', 'store', None),
                         '-S': ('sparse', 'store', None),
                         '-T': ('src_cache', 'store', None),
                         '-U': ('force_share', 'store_true', None),
                         '-W': ('out_of_order', 'store_true', None),
                         '-c': ('compress', 'store_true', None),
                         '-f': ('src_fmt', 'store', None),
                         '-l': ('snapshot', 'store', None),
                         '-m': ('threads', 'store', None),
                         '-n': ('no_create', 'store_true', None),
                         '-p': ('progress', 'store_true', None),
                         '-q': ('quiet', 'store_true', None),
                         '-r': ('rate', 'store', None),
                         '-t': ('cache', 'store', None)}},
 'info': {'defaults': {'_image_fmts': ('fmt',),
                       '_image_operands': ('image',),
                       'backing_chain': False,
                       'fmt': None,
                       'force_share': False,
                       'image_opts': False,
                       'object': [],
                       'output': 'human'},
          'func': 'blkjobs.cli.cmd_info:run',
          'operands': (('image', None),),
          'options': {'--backing-chain': ('backing_chain', 'store_true', None),
                      '--force-share': ('force_share', 'store_true', None),
                      '--image-opts': ('image_opts', 'store_true', None),
                      '--object': ('object', 'append', None),
                      '--output': ('output', 'store', ('human', 'json')),
                      '-U': ('force_share', 'store_true', None),
                      '-f': ('fmt', 'store', None)}},
 'map': {'defaults': {'_image_fmts': ('fmt',),
                      '_image_operands': ('image',),
                      'fmt': None,
                      'force_share': False,
                      'image_opts': False,
                      'max_length': None,
                      'object': [],
                      'output': 'human',
                      'start_offset': '0'},
         'func': 'blkjobs.cli.cmd_map:run',
         'operands': (('image', None),),
         'options': {'--force-share': ('force_share', 'store_true', None),
                     '--image-opts': ('image_opts', 'store_true', None),
                     '--max-length': ('max_length', 'store', None),
                     '--object': ('object', 'append', None),
                     '--output': ('output', 'store', ('human', 'json')),
                     '--start-offset': ('start_offset', 'store', None),
                     '-U': ('force_share', 'store_true', None),
                     '-f': ('fmt', 'store', None),
                     '-l': ('max_length', 'store', None),
                     '-s': ('start_offset', 'store', None)}}}
