"""``qemu-img amend -o OPTIONS IMG`` on an open node: the options parsed
and checked as qemu-img 7.2 does (its texts), then applied in QEMU's order:
upgrade, backing file check, lazy refcounts, refcount width, size,
downgrade (:mod:`blkjobs.formats.qcow2.amend`)."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..errors import UsageError
from ..units import has_help_option, option_items, parse_opt_size

AMEND_HELP = """Amend options for 'qcow2':
  backing_file=<str>     - File name of a base image
  backing_fmt=<str>      - Image format of the base image
  compat=<str>           - Compatibility level (v2 [0.10] or v3 [1.1])
  data_file=<str>        - File name of an external data file
  data_file_raw=<bool (on/off)> - The external data file must stay valid as a raw image
  encrypt.iter-time=<num> - Time to spend in PBKDF in milliseconds
  encrypt.keyslot=<num>  - Select a single keyslot to modify explicitly
  encrypt.new-secret=<str> - New secret to set in the matching keyslots. Empty string to erase
  encrypt.old-secret=<str> - Select all keyslots that match this password
  encrypt.state=<str>    - Select new state of affected keyslots (active/inactive)
  lazy_refcounts=<bool (on/off)> - Postpone refcount updates
  refcount_bits=<num>    - Width of a reference count entry in bits
  size=<size>            - Virtual disk size
"""
_AMEND = ("backing_file", "backing_fmt", "compat", "data_file", "data_file_raw",
          "encrypt.iter-time", "encrypt.keyslot", "encrypt.new-secret", "encrypt.old-secret",
          "encrypt.state", "lazy_refcounts", "refcount_bits", "size")
_CREATE_ONLY = ("encryption", "cluster_size", "preallocation", "extended_l2",
                "compression_type", "encrypt.format", "encrypt.key-secret",
                "encrypt.cipher-alg", "encrypt.cipher-mode", "encrypt.ivgen-alg",
                "encrypt.ivgen-hash-alg", "encrypt.hash-alg", "nocow", "extent_size_hint")
_LUKS_CREATE_ONLY = ("key-secret", "cipher-alg", "cipher-mode", "ivgen-alg", "ivgen-hash-alg",
                     "hash-alg", "size")
LUKS_AMEND_HELP = """Amend options for 'luks':
  iter-time=<num>        - Time to spend in PBKDF in milliseconds
  keyslot=<num>          - Select a single keyslot to modify explicitly
  new-secret=<str>       - New secret to set in the matching keyslots. Empty string to erase
  old-secret=<str>       - Select all keyslots that match this password
  state=<str>            - Select new state of affected keyslots (active/inactive)
"""
_BOOL = {"on": True, "off": False, "yes": True, "no": False, "true": True, "false": False}


def wants_help(options: str) -> bool:
    return has_help_option(options)


def _items(options: str, allowed, create_only) -> dict[str, str]:
    """``a=b,c=d`` (later values win); a name not in ``allowed`` is refused
    as qemu-img refuses it (with a hint when only create takes it)."""
    out: dict[str, str] = {}
    for item in option_items(options):     # ``,,``: a comma inside a value
        name, _, val = item.partition("=")
        if name not in allowed:
            hint = ("\nThis option is only supported for image creation"
                    if name in create_only else "")
            raise UsageError(f"Invalid parameter '{name}'{hint}")
        out[name] = val
    return out


def parse(options: str) -> dict[str, str]:
    """``a=b,c=d`` (later values win) with qemu-img's refusals."""
    out = _items(options, _AMEND, _CREATE_ONLY)
    for name in ("lazy_refcounts", "data_file_raw"):
        if name in out and out[name] not in _BOOL:
            raise UsageError(f"Parameter '{name}' expects 'on' or 'off'")
    if "refcount_bits" in out and not out["refcount_bits"].isdigit():
        raise UsageError("Parameter 'refcount_bits' expects a number")
    if "size" in out:
        parse_opt_size(out["size"], "size")
    return out


def _key_slots(drv, opts: dict[str, str]) -> tuple[Any, Any] | None:
    """The key slots of an encrypted qcow2 image and the ``encrypt.*``
    options to apply to them (QEMU's refusals); None without such options."""
    if not any(k.startswith("encrypt.") for k in opts):
        return None
    if not drv.encrypted:
        raise UsageError("Can't amend encryption options - encryption not present")
    from ..formats.luks_slots import KeySlots, parse_amend
    slots = KeySlots.of(drv)
    return slots, parse_amend(opts, "encrypt.")


def amend_luks(node, options: str, force: bool = False) -> None:
    """``qemu-img amend`` of a ``luks`` image: its key slots (QEMU's option
    names and texts)."""
    from ..formats.luks_slots import AMEND_OPTIONS, KeySlots, parse_amend
    o = parse_amend(_items(options, AMEND_OPTIONS, _LUKS_CREATE_ONLY))
    KeySlots.of(node.driver).amend(o, force)


def amend(node, opts: dict[str, str], progress: Callable[[float], None] | None = None,
          force: bool = False) -> None:
    """Apply ``opts`` (from :func:`parse`) to the qcow2 image of ``node``
    (opened writable, holding resize); ``encrypt.*``: its LUKS key slots
    (``force``: amend's ``--force``)."""
    from ..formats.qcow2 import amend as qa
    from .resize import resize_node
    drv = node.driver
    h = drv.header
    old_version = h.version
    new_version = old_version
    compat = opts.get("compat")
    if compat:
        if compat in ("0.10", "v2"):
            new_version = 2
        elif compat in ("1.1", "v3"):
            new_version = 3
        else:
            raise UsageError(f"Unknown compatibility level {compat}")
    slots = _key_slots(drv, opts)
    lazy = _BOOL[opts["lazy_refcounts"]] if "lazy_refcounts" in opts else None
    bits = int(opts["refcount_bits"]) if "refcount_bits" in opts else h.refcount_bits
    if bits <= 0 or bits > 64 or bits & (bits - 1):
        raise UsageError("Refcount width must be a power of two and may not exceed 64 bits")
    if opts.get("data_file") and not drv.external:
        raise UsageError("data-file can only be set for images that use an external data file")
    if _BOOL.get(opts.get("data_file_raw", "off")) and not h.data_file_raw:
        raise UsageError("data-file-raw cannot be set on existing images")
    try:
        if new_version > old_version:
            qa.upgrade(drv, progress)
        if "backing_file" in opts or "backing_fmt" in opts:
            if (opts.get("backing_file"), opts.get("backing_fmt")) != (
                    h.backing_file, h.backing_format):
                raise UsageError("Cannot amend the backing file\n"
                                 "You can use 'qemu-img rebase' instead.")
        if slots is not None:
            slots[0].amend(slots[1], force)
        if lazy is not None:
            if lazy and new_version < 3 and not h.compatible & 1:
                raise qa.AmendError("Lazy refcounts only supported with compatibility level "
                                    "1.1 and above (use compat=1.1 or greater)")
            qa.set_lazy_refcounts(drv, lazy)
        if bits != h.refcount_bits:
            if new_version < 3 and bits != 16:
                raise UsageError("Refcount widths other than 16 bits require compatibility "
                                 "level 1.1 or above (use compat=1.1 or greater)")
            qa.change_refcount_bits(drv, bits, progress)
        if "data_file" in opts or "data_file_raw" in opts:
            qa.set_data_file(drv, opts.get("data_file"), _BOOL.get(opts.get("data_file_raw", "")))
        size = parse_opt_size(opts["size"], "size") if opts.get("size") else 0
        if size:
            resize_node(node, size)
        if new_version < old_version:
            qa.downgrade(drv, bool(h.backing_file), progress)
    except qa.AmendError as e:
        raise UsageError(str(e)) from None
