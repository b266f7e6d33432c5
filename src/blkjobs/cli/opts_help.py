"""``-o help`` (or ``-o ?``) of ``create`` and ``convert``: qemu-img's list
of the creation options of a format, with the protocol's options when a
target file is named. The ``-o`` of these commands is
:class:`.opts_action.OptsAction`: it lets ``-o help`` stand without the operands (qemu-img prints the list
before it looks for them)."""
from __future__ import annotations

import sys

from ..errors import UsageError
from ..units import has_help_option

TYPE_CHECKING = False     # typing.TYPE_CHECKING without importing typing (start-up)
if TYPE_CHECKING:
    from typing import Any

_QCOW2 = """\
  backing_file=<str>     - File name of a base image
  backing_fmt=<str>      - Image format of the base image
  cluster_size=<size>    - qcow2 cluster size
  compat=<str>           - Compatibility level (v2 [0.10] or v3 [1.1])
  compression_type=<str> - Compression method used for image cluster compression
  data_file=<str>        - File name of an external data file
  data_file_raw=<bool (on/off)> - The external data file must stay valid as a raw image
  encrypt.cipher-alg=<str> - Name of encryption cipher algorithm
  encrypt.cipher-mode=<str> - Name of encryption cipher mode
  encrypt.format=<str>   - Encrypt the image, format choices: 'aes', 'luks'
  encrypt.hash-alg=<str> - Name of encryption hash algorithm
  encrypt.iter-time=<num> - Time to spend in PBKDF in milliseconds
  encrypt.ivgen-alg=<str> - Name of IV generator algorithm
  encrypt.ivgen-hash-alg=<str> - Name of IV generator hash algorithm
  encrypt.key-secret=<str> - ID of secret providing qcow AES key or LUKS passphrase
  encryption=<bool (on/off)> - Encrypt the image with format 'aes'. (Deprecated in favor of encrypt.format=aes)
  extended_l2=<bool (on/off)> - Extended L2 tables
  lazy_refcounts=<bool (on/off)> - Postpone refcount updates
  preallocation=<str>    - Preallocation mode (allowed values: off, metadata, falloc, full)
  refcount_bits=<num>    - Width of a reference count entry in bits
  size=<size>            - Virtual disk size
"""
_LUKS = """\
  cipher-alg=<str>       - Name of encryption cipher algorithm
  cipher-mode=<str>      - Name of encryption cipher mode
  hash-alg=<str>         - Name of encryption hash algorithm
  iter-time=<num>        - Time to spend in PBKDF in milliseconds
  ivgen-alg=<str>        - Name of IV generator algorithm
  ivgen-hash-alg=<str>   - Name of IV generator hash algorithm
  key-secret=<str>       - ID of the secret that provides the keyslot passphrase
  size=<size>            - Virtual disk size
"""
_SIZE = "  size=<size>            - Virtual disk size\n"
#: a format's own creation options (qemu-img 7.2's lines)
FORMAT_OPTIONS = {"qcow2": _QCOW2, "luks": _LUKS, "raw": _SIZE}
_FILE = """\
  extent_size_hint=<size> - Extent size hint for the image file, 0 to disable
  nocow=<bool (on/off)>  - Turn off copy-on-write (valid only on btrfs)
  preallocation=<str>    - Preallocation mode (allowed values: off, falloc, full)
  size=<size>            - Virtual disk size
"""
_NBD = """\
  preallocation=<str>    - Preallocation mode (allowed values: off)
  size=<size>            - Virtual disk size
"""
#: the protocol drivers' options (a name ``PROTO:...`` or ``PROTO://...``)
_PROTOCOLS = {"file": _FILE, "nbd": _NBD, "nbd+tcp": _NBD, "nbd+unix": _NBD, "ssh": _SIZE}
#: protocols qemu-img knows that create no image
_NO_CREATE = ("blkdebug", "blkverify", "http", "https", "ftp", "ftps", "null-co", "null-aio")


def wants_help(texts: list[str] | None) -> bool:
    """Whether the ``-o`` values ask for the list (an item ``help`` or ``?``;
    ``x,,help`` is the one item ``x,help``)."""
    return has_help_option(texts)


def check_lists(args: Any) -> None:
    """qemu-img's refusal of the first invalid ``-o`` argument."""
    bad = getattr(args, "_invalid_opts", None)
    if bad is not None:
        raise UsageError(f"Invalid option list: {bad}")


class OptionsHelp(Exception):
    """Raised instead of a usage error for missing operands after ``-o
    help``: ``args`` is the command's namespace, to run as it is."""
    def __init__(self, args: Any):
        super().__init__("-o help")
        self.args_ns = args


def operands_missing(parser: Any, message: str) -> None:
    """Called by the parser's ``error``: raise :class:`OptionsHelp` when the
    error is missing operands of a command given ``-o help``."""
    ns = getattr(parser, "_opts_help_ns", None)
    if ns is not None and message.startswith("the following arguments are required"):
        raise OptionsHelp(ns)


def _protocol(filename: str) -> str:
    """qemu's protocol of a file name: the text before a ``:`` that comes
    before any ``/`` (none: the file protocol)."""
    cut = len(filename)
    for ch in ":/\\":
        at = filename.find(ch)
        if at != -1:
            cut = min(cut, at)
    return filename[:cut] if cut < len(filename) and filename[cut] == ":" else "file"


def print_help(fmt: str, filename: str | None) -> int:
    """qemu-img's ``print_block_option_help``: the format's options, with the
    protocol's (sorted, the format's first) when a file is named."""
    if fmt not in FORMAT_OPTIONS:
        refuse_format(fmt, None)
    lines = FORMAT_OPTIONS[fmt].splitlines()
    if filename is None:
        sys.stdout.write(f"Supported {fmt} options:\n" + "\n".join(sorted(lines)) +
                         "\n\nThe protocol level may support further options.\n"
                         "Specify the target filename to include those options.\n")
        return 0
    proto = _protocol(filename)
    if proto in _NO_CREATE:
        raise UsageError(f"Protocol driver '{proto}' does not support image creation")
    if proto not in _PROTOCOLS:
        raise UsageError(f"Unknown protocol '{proto}'")
    names = {line.split("=")[0] for line in lines}
    lines += [line for line in _PROTOCOLS[proto].splitlines()
              if line.split("=")[0] not in names]
    sys.stdout.write("Supported options:\n" + "\n".join(sorted(lines)) + "\n")
    return 0


def refuse_format(fmt: str, filename: str | None) -> None:
    """Refuse to create an image of ``fmt`` (not one blkjobs writes): in
    qemu-img's words for a format it does not know or cannot create (its
    order: the format, the protocol of ``filename``, then whether the format
    creates images), in blkjobs' for one qemu-img writes and blkjobs does not."""
    from ..imageops.rebase import QEMU_DRIVERS, QEMU_NO_CREATE
    if fmt not in QEMU_DRIVERS:
        raise UsageError(f"Unknown file format '{fmt}'")
    if filename is not None:
        proto = _protocol(filename)
        if proto not in _PROTOCOLS and proto not in _NO_CREATE:
            raise UsageError(f"Unknown protocol '{proto}'")
    if fmt in QEMU_NO_CREATE:
        raise UsageError(f"Format driver '{fmt}' does not support image creation")
    raise UsageError(f"Format '{fmt}' is not supported by blkjobs (raw, qcow2, luks)")
