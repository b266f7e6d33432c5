"""``--image-opts`` and ``--object``, the options qemu-img's image commands
share: a command registers them with :func:`add`, naming the operands that
are images; :func:`apply` (run by ``main`` before the command, when the
command line has either) defines the objects and marks those operands as
option strings (:mod:`blkjobs.graph.blockspec`). :func:`blkdebug_filter`
is the ``blkdebug`` filter of the job layer that ``main`` hands the graph
layer, for names that ask for it."""
from __future__ import annotations


from ..errors import UsageError

TYPE_CHECKING = False     # typing.TYPE_CHECKING without importing typing (start-up)
if TYPE_CHECKING:
    from typing import Any


def add(p: Any, *operands: str, fmt: tuple[str, ...] = ("fmt",)) -> None:
    """``--image-opts`` (the ``operands``: dests, ``NAME[0]`` for the first
    of a list, ``NAME:PREFIX`` for the items starting with PREFIX, without
    it; none: no --image-opts, as create) and ``--object``; ``fmt``:
    the dests of the format options that --image-opts excludes."""
    if operands:
        p.add_argument("--image-opts", action="store_true",
                       help="the image names are option strings (driver=qcow2,file.filename=F)")
    if "--object" not in p._option_string_actions:    # a command that defines its own
        p.add_argument("--object", action="append", default=[], metavar="OBJECTDEF",
                       help="define an object, e.g. secret,id=sec0,data=PASSWORD (repeatable)")
    p.set_defaults(_image_operands=operands, _image_fmts=fmt)


def apply(args: Any) -> None:
    # (not graph.blockspec, which reads the names: a plain file name does not need it)
    from ..formats.sniff import mark_image_opts
    objects = getattr(args, "object", None) or []
    if objects:
        from ..formats.secrets import add_secret_object
        for text in objects:
            add_secret_object(text)
    if not getattr(args, "image_opts", False):
        return
    if any(getattr(args, f, None) for f in args._image_fmts):
        raise UsageError("--image-opts and --format are mutually exclusive")
    for dest in args._image_operands:
        dest, _, prefix = dest.partition(":")       # "operands:if=": dd's if=NAME
        first = dest.endswith("[0]")
        value = getattr(args, dest[:-3] if first else dest, None)
        if isinstance(value, list):
            value = value[:1] if first else value
        for name in [value] if isinstance(value, str) else value or []:
            if name.startswith(prefix):
                mark_image_opts(name[len(prefix):])


def blkdebug_filter(inner: Any, opts: dict[str, Any]) -> Any:
    """QEMU's blkdebug rules over ``inner`` (the daemon's parser of them)."""
    from ..daemon.blkdebug_commands import parse_rules
    from ..daemon.protocol import QMPError
    from ..engine import QemuBlkdebug
    from ..errors import ImageError
    above = bool(opts.pop("x-above", False))
    try:
        rules = parse_rules(opts)
    except QMPError as e:       # qemu-img names the image first
        raise ImageError(str(e)) from None
    return QemuBlkdebug(inner, rules, "", format_events=not above, file_offsets=not above)
