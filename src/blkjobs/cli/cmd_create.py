"""blkjobs create -f raw|qcow2 [-o OPTS] [-b BACKING -F FMT] IMG [SIZE]

Prints qemu-img's ``Formatting '...', fmt=... size=...`` line (the options
it lists are qemu-img's defaults plus what was given).
"""
from __future__ import annotations

import os
import sys

from ..errors import BlkjobsError, UsageError
from ..units import option_items, parse_opt_size, parse_size, sector_size
from . import image_opts
from .opts_help import check_lists, print_help, refuse_format, wants_help

#: qemu-img's luks create options (qcow2: with the prefix ``encrypt.``), in
#: the order its Formatting line lists them
_LUKS = ("key-secret", "cipher-alg", "cipher-mode", "ivgen-alg", "ivgen-hash-alg",
         "hash-alg", "iter-time")
_BOOL = {"on": True, "off": False, "true": True, "false": False, "yes": True, "no": False}


def register(sub):
    p = sub.add_parser("create", help="create a raw or qcow2 image",
                       description="Create IMG of SIZE (a qcow2 overlay may take its "
                       "backing file's size).")
    p.add_argument("-f", dest="fmt", default="raw", metavar="FMT",
                   help="raw (default), qcow2 or luks")
    p.add_argument("--object", dest="objects", action="append", metavar="OBJECT",
                   help="secret,id=ID,data=TEXT|file=PATH[,format=raw|base64]: a password "
                   "for key-secret=ID (luks) or encrypt.key-secret=ID (qcow2)")
    from .opts_action import OptsAction     # argparse: only with the parser
    p.add_argument("-o", dest="options", action=OptsAction, metavar="OPTS",
                   help="cluster_size=..,extended_l2=on|off,preallocation=..,compat=..,"
                   "refcount_bits=..; -o help lists them")
    p.add_argument("-b", dest="backing", metavar="BACKING", help="backing file (qcow2)")
    p.add_argument("-F", dest="backing_fmt", metavar="FMT", help="backing file format")
    p.add_argument("-u", dest="unsafe", action="store_true",
                   help="do not open the backing file (needs SIZE and -F)")
    p.add_argument("-q", dest="quiet", action="store_true", help="quiet")
    p.add_argument("image")
    p.add_argument("size", nargs="?")
    image_opts.add(p)
    p.set_defaults(func=run)


def parse_opts(texts: list[str] | None, fmt: str) -> dict:
    """``-o a=b,c=d`` (may repeat) into create_image keyword arguments.
    Unknown names are refused like qemu-img (``Invalid parameter 'x'``)."""
    out: dict = {}
    for item in option_items(texts):        # ``,,``: a comma inside a value
        name, _, val = item.partition("=")
        name, val = name.strip(), val.strip()
        if fmt == "raw" and name not in ("preallocation", "size", "extent_size_hint"):
            raise UsageError(f"Invalid parameter '{name}'")
        if fmt == "luks" and name not in _LUKS + ("preallocation", "size"):
            raise UsageError(f"Invalid parameter '{name}' for format luks")
        if fmt == "luks" and name in _LUKS:
            out[name.replace("-", "_")] = val
        elif fmt == "qcow2" and name.startswith("encrypt.") and name[8:] in _LUKS + ("format",):
            out[name] = val
        elif fmt == "qcow2" and name == "encryption":
            b = _BOOL.get(val.lower() or "on")
            if b is None:
                raise UsageError("Parameter 'encryption' expects 'on' or 'off'")
            out[name] = b
        elif name == "size":
            out["size"] = parse_opt_size(val, "size")
        elif name == "cluster_size":
            out["cluster_size"] = parse_opt_size(val, "cluster_size")
        elif name in ("extended_l2", "lazy_refcounts", "data_file_raw"):
            b = _BOOL.get(val.lower())
            if b is None:
                raise UsageError(f"Parameter '{name}' expects 'on' or 'off'")
            out[name] = b
        elif name == "extent_size_hint":
            # QEMU gives it to XFS (FS_IOC_FSSETXATTR) only; blkjobs shows
            # it as qemu-img does and leaves the filesystem's default
            out["extent_size_hint"] = parse_opt_size(val, "extent_size_hint")
        elif name == "data_file":
            out["data_file"] = val
        elif name in ("preallocation", "compat"):
            out[name] = val
        elif name == "refcount_bits":
            try:
                out["refcount_bits"] = int(val)
            except ValueError:
                raise UsageError("Parameter 'refcount_bits' expects a number") from None
        elif name == "backing_file":
            out["backing_file"] = val
        elif name == "backing_fmt":
            out["backing_format"] = val
        elif name == "compression_type":
            if val not in ("zlib", "zstd"):
                raise UsageError(f"Parameter 'compression-type' does not accept value '{val}'")
            out[name] = val
        else:
            raise UsageError(f"Invalid parameter '{name}'")
    return out


def formatting_line(path: str, fmt: str, size: int, opts: dict) -> str:
    """qemu-img's line: its options in its order (the size as given)."""
    hint = opts.get("extent_size_hint")
    tail = [] if hint is None else [f"extent_size_hint={hint}"]
    if fmt in ("raw", "luks"):
        extra = [f"{k}={opts[k.replace('-', '_')]}" for k in _LUKS
                 if opts.get(k.replace("-", "_")) is not None] if fmt == "luks" else []
        if opts.get("preallocation"):
            extra.append(f"preallocation={opts['preallocation']}")
        return " ".join([f"Formatting '{path}', fmt={fmt} size={size}", *extra, *tail])
    # given, encryption=off too (qemu-img lists the options that were set)
    enc = [f"encryption={'on' if opts['encryption'] else 'off'}"] if "encryption" in opts else []
    enc += [f"encrypt.{k}={opts['encrypt.' + k]}" for k in ("format",) + _LUKS
            if opts.get("encrypt." + k) is not None]
    parts = [f"Formatting '{path}', fmt=qcow2", *enc,
             f"cluster_size={opts.get('cluster_size', 65536)}",
             f"extended_l2={'on' if opts.get('extended_l2') else 'off'}"]
    if opts.get("preallocation"):
        parts.append(f"preallocation={opts['preallocation']}")
    parts += [f"compression_type={opts.get('compression_type', 'zlib')}", f"size={size}"]
    if opts.get("compat"):
        parts.append(f"compat={opts['compat']}")
    if opts.get("backing_file"):
        # qemu-img prints option strings as option syntax: a comma doubled
        parts.append(f"backing_file={opts['backing_file'].replace(',', ',,')}")
        if opts.get("backing_format"):
            parts.append(f"backing_fmt={opts['backing_format']}")
    if opts.get("data_file") is not None:
        parts.append(f"data_file={opts['data_file'].replace(',', ',,')}")
    if opts.get("data_file_raw") is not None:
        parts.append(f"data_file_raw={'on' if opts['data_file_raw'] else 'off'}")
    parts += [f"lazy_refcounts={'on' if opts.get('lazy_refcounts') else 'off'}",
              f"refcount_bits={opts.get('refcount_bits', 16)}"]
    return " ".join(parts + tail)


_V3 = "only supported with compatibility level 1.1 and above (use version=v3 or greater)"


def check_qcow2(path: str, opts: dict) -> None:
    """qemu-img's refusals of qcow2 options (said after the Formatting line,
    naming the image), in its order."""
    compat = opts.get("compat", "1.1")
    if compat not in ("0.10", "1.1", "v2", "v3"):
        raise UsageError(f"{path}: Parameter 'version' does not accept value '{compat}'")
    prealloc = opts.get("preallocation", "off")
    if prealloc not in ("off", "metadata", "falloc", "full"):
        raise UsageError(f"{path}: Parameter 'preallocation' does not accept value '{prealloc}'")
    v2 = compat in ("0.10", "v2")
    cs = opts.get("cluster_size", 65536)
    if cs < 512 or cs > 2 << 20 or cs & (cs - 1):
        raise UsageError(f"{path}: Cluster size must be a power of two between 512 and 2048k")
    if opts.get("extended_l2"):
        if v2:
            raise UsageError(f"{path}: Extended L2 entries are {_V3}")
        if cs < 16384:
            raise UsageError(f"{path}: Extended L2 entries are only supported with cluster "
                             "sizes of at least 16384 bytes")
    if v2 and opts.get("lazy_refcounts"):
        raise UsageError(f"{path}: Lazy refcounts {_V3}")
    bits = opts.get("refcount_bits", 16)
    if bits > 64 or bits < 1 or bits & (bits - 1):
        raise UsageError(f"{path}: Refcount width must be a power of two and may not "
                         "exceed 64 bits")
    if v2 and bits != 16:
        raise UsageError(f"{path}: Different refcount widths than 16 bits require "
                         "compatibility level 1.1 or above (use version=v3 or greater)")
    if opts.get("data_file_raw") and opts.get("data_file") is None:
        raise UsageError(f"{path}: data-file-raw requires data-file")
    if opts.get("data_file_raw") and opts.get("backing_file"):
        raise UsageError(f"{path}: Backing file and data-file-raw cannot be used at the "
                         "same time")
    if v2 and opts.get("data_file") is not None:
        raise UsageError(f"{path}: External data files are {_V3}")
    if v2 and opts.get("compression_type", "zlib") != "zlib":
        raise UsageError(f"{path}: Non-zlib compression type is {_V3}")
    l2_bytes = cs * (cs // (16 if opts.get("extended_l2") else 8))    # what an L1 entry maps
    if -(-opts.get("size", 0) // l2_bytes) > (32 << 20) // 8:      # the L1 table's limit
        raise UsageError(f"{path}: The image size is too large for file format 'qcow2' "
                         "(try using a larger cluster size)")
    if opts.get("backing_file") and opts.get("preallocation", "off") != "off" \
            and not opts.get("extended_l2"):
        raise UsageError(f"{path}: Backing file and preallocation can only be used at the "
                         "same time if extended_l2 is on")


def check_raw(path: str, opts: dict) -> None:
    mode = opts.get("preallocation", "off")
    if mode == "metadata":
        raise UsageError(f"{path}: Unsupported preallocation mode: metadata")
    if mode not in ("off", "falloc", "full"):
        raise UsageError(f"{path}: invalid parameter value: {mode}")


def _backing(args, opts: dict, size: int | None) -> str | int | None:
    """qemu-img's checks of a backing file, in its order: the name, then
    (unless -u) the file opened (with -F's driver; its size when none was
    given), then -F required. Returns what qemu-img prints on stderr when
    it refuses (the image named; hints on lines of their own), else the
    backing file's size (None with -u)."""
    from ..formats import FORMATS, open_image, probe_format
    from ..graph import resolve_backing
    from ..formats.sniff import is_spec
    from ..imageops.images import open_one
    from . import progname
    image, name, fmt = args.image, opts["backing_file"], opts.get("backing_format")
    err = f"{progname()}: {image}: "
    if name == "":
        return err + "Expected backing file name, got empty string\n"
    if os.path.abspath(resolve_backing(os.path.abspath(image), name)) == os.path.abspath(image):
        return err + "Error: Trying to create an image with the same filename as the backing file\n"
    bsize = None
    if not args.unsafe:
        # the name qemu-img opens (and says): relative to the image's directory as given
        shown = name if name.startswith("/") or "/" not in image else \
            image[:image.rindex("/") + 1] + name
        path = resolve_backing(os.path.abspath(image), name)
        try:
            if fmt is not None and fmt not in FORMATS:
                raise UsageError(f"Unknown driver '{fmt}'")
            if is_spec(path):           # json:, file:, blkdebug: (graph/blockspec.py)
                detected = fmt
                b = open_one(path, fmt)
                try:
                    bsize = sector_size(b.size)
                finally:
                    b.close()
            else:
                try:
                    os.close(os.open(path, os.O_RDONLY))
                except OSError as e:
                    raise UsageError(f"Could not open '{shown}': {e.strerror}") from None
                detected = fmt or probe_format(path)
                # its size only: an encrypted backing file needs no key here
                with open_image(path, detected, header_only=True) as b:
                    bsize = sector_size(b.size)       # whole sectors, as qemu-img sees it
        except BlkjobsError as e:
            text = str(e)
            for p in (f"'{path}': ", f"'{shown}': "):
                text = text[len(p):] if text.startswith(p) else text
            if text == "not a qcow2 image (bad magic)":
                text = "Image is not in qcow2 format"
            return f"{err}{text}\nCould not open backing image.\n"
        if fmt is None:     # qemu-img's hint ends without a newline
            return f"{err}Backing file specified without backing format\n" \
                f"Detected format of {detected}."
    elif fmt is None:
        return err + "Backing file specified without backing format\n"
    return bsize


def run(args) -> int:
    from ..formats import FORMATS, create_image
    from ..formats.secrets import add_secret_object
    check_lists(args)
    for obj in args.objects or []:
        add_secret_object(obj)
    if wants_help(args.options):
        return print_help(args.fmt, args.image)
    if args.fmt not in FORMATS:
        try:
            refuse_format(args.fmt, args.image)
        except UsageError as e:         # qemu-img names the image
            raise UsageError(f"{args.image}: {e}") from None
    try:
        opts = parse_opts(args.options, args.fmt)
    except UsageError as e:         # qemu-img names the image (blkjobs' own refusals: not)
        raise UsageError(f"{args.image}: {e}") from None
    size = opts.pop("size", None)
    if args.size is not None:
        if size is not None:
            raise UsageError(f"{args.image}: The image size must be specified only once")
        size = parse_size(args.size, "image size")
    if args.backing is not None:
        opts["backing_file"] = args.backing
    if args.backing_fmt:
        opts["backing_format"] = args.backing_fmt
    if opts.get("backing_file") is not None:
        if args.fmt == "raw":
            raise UsageError("Backing file not supported for file format 'raw'")
        failed = _backing(args, opts, size)
        if isinstance(failed, str):
            sys.stderr.write(failed)
            return 1
        size = failed if size is None else size
    if size is None:
        raise UsageError(f"{args.image}: Image creation needs a size parameter")
    if not args.quiet:
        print(formatting_line(args.image, args.fmt, size, opts), flush=True)
    opts.pop("extent_size_hint", None)
    if args.fmt != "luks":
        (check_qcow2 if args.fmt == "qcow2" else check_raw)(args.image, dict(opts, size=size))
    size = sector_size(size)        # qemu-img makes images of whole sectors
    path = args.image[5:] if args.image.startswith("file:") else args.image   # a name with a colon
    # an existing image is locked (write, nobody else writing) before it is
    # overwritten, as qemu-img does: one in use is refused, not truncated
    from ..graph.lock import ImageLock, LockConflict
    lock = None
    if os.path.isfile(path):
        try:
            lock = ImageLock(path, write=True)
        except LockConflict as e:
            raise LockConflict(f"{args.image}: {e.bare}", e.path) from None
        except OSError:
            pass                # create_image says what is wrong
    try:
        create_image(path, args.fmt, size, **opts)
    except OSError as e:
        raise UsageError(f"{args.image}: Could not create image: {e.strerror}") from None
    except BlkjobsError as e:
        if args.fmt != "luks" and opts.get("data_file") is None \
                and not any(k.startswith("encrypt") for k in opts):
            raise
        raise UsageError(f"{args.image}: {e}") from None      # qemu-img names the image
    finally:
        if lock is not None:
            lock.release()
    return 0
