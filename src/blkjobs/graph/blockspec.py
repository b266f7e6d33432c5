"""qemu-img's image-name syntaxes, parsed into a tree of block layers and
opened as one driver.

Wherever qemu-img takes an image name it also takes:

* ``json:{...}``: QEMU's block options as JSON (single-quoted strings too),
  nested (``"file": {"filename": ...}``) or dotted (``"file.filename"``);
* ``file:PATH``: a plain file whose name may hold a colon;
* ``blkdebug:CONFIG:IMAGE``: IMAGE under blkdebug's fault injection, its
  rules read from the config file (``[inject-error]``/``[set-state]``
  sections of ``key = "value"`` lines);
* with ``--image-opts``, an option string ``driver=qcow2,file.filename=F``
  (``,,`` is a comma inside a value): ``formats.sniff.mark_image_opts`` tells this
  module which names are such strings.

A tree is made of layers (:class:`Layer`): a format (``qcow2``, ``raw``, or
none given: probed) over a protocol (``file``, ``null-co``, ``nbd``), with
``blkdebug`` as a filter anywhere between. :func:`open_spec` opens it as one
driver: the format driver over the protocol's file, ``null-co`` as
:class:`~blkjobs.formats.null.Null`, ``raw``'s ``offset``/``size`` as
:class:`~blkjobs.formats.slice.Slice`, and blkdebug as the filter that the
layer owning it registered (``formats.register_filter``; the graph layer has no
fault injection of its own). Bad names raise :class:`~blkjobs.errors.ImageError`
with qemu-img's text (the caller prefixes ``Could not open 'NAME': ``).
"""
# long because: one reader for every syntax above, and the tree's two classes
# written out by hand (not dataclasses: see Layer)
from __future__ import annotations

from .blockspec_net import (blkdebug_display, nbd_connect_failure, nbd_display, net_options,
                            open_ssh, take_probed)
from ..errors import ImageError
from ..formats.base import Driver, FormatOpenError
from ..formats import filter_wrap
from ..formats.sniff import is_image_opts, is_spec

TYPE_CHECKING = False     # typing.TYPE_CHECKING without importing typing (start-up)
if TYPE_CHECKING:
    from typing import Any

FORMAT_DRIVERS = ("qcow2", "raw", "luks")
PROTOCOL_DRIVERS = ("file", "null-co", "nbd", "ssh")
FILTER_DRIVERS = ("blkdebug",)
#: drivers over a list of ``children`` (formats.quorum: read-only, file children)
QUORUM_DRIVERS = ("quorum",)
#: options every node takes (QEMU's generic block options), ignored here
_GENERIC = {"driver", "node-name", "read-only", "auto-read-only", "force-share", "discard",
            "detect-zeroes", "cache", "cache.direct", "cache.no-flush", "locking", "aio",
            "aio-max-batch", "x-check-cache-dropped", "drop-cache", "pr-manager"}
_OPTIONS = {
    "qcow2": {"file", "backing", "lazy-refcounts", "pass-discard-request", "pass-discard-snapshot",
              "pass-discard-other", "overlap-check", "l2-cache-size", "l2-cache-entry-size",
              "refcount-cache-size", "cache-size", "cache-clean-interval", "data-file", "encrypt"},
    "raw": {"file", "offset", "size"},
    "luks": {"file", "key-secret"},
    "file": {"filename"},
    "null-co": {"size", "read-zeroes", "latency-ns"},
    "nbd": {"server", "export", "tls-creds", "tls-hostname", "x-dirty-bitmap",
            "reconnect-delay", "open-timeout", "host", "port", "path"},
    # options checked and the server connected, the SSH session not spoken
    "ssh": {"server", "path", "user", "host-key-check", "host", "port"},
    "quorum": {"children", "vote-threshold", "blkverify", "rewrite-corrupted", "read-pattern"},
    "blkdebug": {"image", "config", "inject-error", "set-state", "align", "max-transfer",
                 "opt-write-zero", "max-write-zero", "opt-discard", "max-discard"},
}



def file_name(name: str) -> str:
    """The file under the image ``name`` (``name`` itself unless it is a
    spec naming a file; a spec without one: ``name``)."""
    if not is_spec(name):
        return name
    layer: Layer | None = parse(name).top
    while layer is not None:
        if layer.driver == "file":
            return str(layer.opts["filename"])
        layer = layer.child
    return name


class Layer:
    """One block node of a spec: its driver (None: a format to probe), its
    own options, and its children (``file``, ``image``). Not a dataclass
    (nor Spec): ``dataclasses`` imports ``inspect``, ~8 ms of start-up."""

    def __init__(self, driver: str | None, opts: dict[str, Any] | None = None,
                 child: Layer | None = None, children: list[Layer] | None = None):
        self.driver = driver
        self.opts: dict[str, Any] = {} if opts is None else opts
        self.child = child
        self.children: list[Layer] = [] if children is None else children   # a quorum's

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and vars(self) == vars(other)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({vars(self)!r})"


class Spec:
    def __init__(self, name: str, top: Layer, display: str):
        self.name = name            # as given (error messages)
        self.top = top
        self.display = display      # what qemu-img shows as the image's file name

    __eq__, __repr__ = Layer.__eq__, Layer.__repr__


# -- the syntaxes -------------------------------------------------------------------


def parse(name: str, fmt: str | None = None) -> Spec:
    """The spec of ``name`` (any syntax; a plain name is a file)."""
    if is_image_opts(name):
        first = name.replace(",,", "\0").split(",", 1)[0].replace("\0", ",")
        if first and "=" not in first:
            raise ImageError(f"Cannot find device='{first}' nor node-name='{first}'")
        tree: dict[str, Any] = unflatten(parse_opts(name))
        display = None
    elif name.startswith("json:"):
        from .qemu_json import parse_json
        tree = unflatten(parse_json(name[5:]))
        display = None
    elif name.startswith("blkdebug:"):
        tree = {"file": _blkdebug_name(name[9:])}
        display = name
    else:
        path = name[5:] if name.startswith("file:") else name
        tree = {"file": {"driver": "file", "filename": path}}
        display = _plain(path)
    if fmt is not None and "driver" not in tree:
        tree["driver"] = fmt
    top = _layer(tree)
    return Spec(name, top, display or _display(top, tree))


def _blkdebug_name(rest: str) -> dict[str, Any]:
    config, sep, image = rest.partition(":")
    if not sep:
        raise ImageError("Could not parse the blkdebug filename")
    out: dict[str, Any] = {"driver": "blkdebug", "image": {"driver": "file", "filename": image}}
    if config:
        out["config"] = config
    return out


def parse_opts(text: str) -> dict[str, str]:
    """QEMU's option string: ``key=value`` items split at commas, ``,,`` a
    comma inside a value; a bare ``key`` is ``key=on``."""
    import re       # here: not at every command's start
    out: dict[str, str] = {}
    for item in re.split(r"(?<!,),(?!,)", text.replace(",,", "\0")):
        item = item.replace("\0", ",")
        if not item:
            continue
        key, sep, value = item.partition("=")
        out[key] = value if sep else "on"
    return out


def unflatten(flat: dict[str, Any]) -> dict[str, Any]:
    """Dotted keys (``file.filename``) into nested dicts, nested dicts with
    dotted keys merged too; a dict keyed ``0``, ``1``... becomes a list."""
    out: dict[str, Any] = {}
    for key, value in flat.items():
        if isinstance(value, dict):
            value = unflatten(value)
        elif isinstance(value, list):
            value = [unflatten(v) if isinstance(v, dict) else v for v in value]
        parts = key.split(".")
        d = out
        for p in parts[:-1]:
            sub = d.setdefault(p, {})
            if not isinstance(sub, dict):
                raise ImageError(f"Cannot add option '{key}': '{p}' has a value already")
            d = sub
        if isinstance(value, dict) and isinstance(d.get(parts[-1]), dict):
            d[parts[-1]].update(value)
        else:
            d[parts[-1]] = value
    return _lists(out)


def _lists(d: dict[str, Any]) -> Any:
    for k, v in d.items():
        if isinstance(v, dict):
            d[k] = _lists(v)
    if d and all(k.isdigit() for k in d):
        return [d[k] for k in sorted(d, key=int)]
    return d


# -- the layers ----------------------------------------------------------------------


def _layer(tree: dict[str, Any], probe: bool = True) -> Layer:
    """The layer of ``tree`` (its children recursively), checked."""
    driver = tree.get("driver")
    if driver is not None and not isinstance(driver, str):
        raise ImageError("Must specify either driver or file")
    if driver is None and not probe:
        driver = "file"
    if driver is not None and driver not in (*FORMAT_DRIVERS, *PROTOCOL_DRIVERS, *FILTER_DRIVERS,
                                             *QUORUM_DRIVERS):
        raise ImageError(f"Unknown driver '{driver}'")
    if driver is None and "filename" in tree and "file" not in tree:
        tree = {**{k: v for k, v in tree.items() if k != "filename"},
                "file": {"filename": tree["filename"]}}
    allowed = _OPTIONS[driver or "qcow2"] | (_OPTIONS["raw"] if driver is None else set())
    for key in tree:
        if key not in allowed and key not in _GENERIC and not key.startswith("cache"):
            kind = "protocol" if driver in PROTOCOL_DRIVERS else "format"
            raise ImageError(f"Block {kind} '{driver or 'raw'}' does not support the option "
                             f"'{key}'")
    opts = {k: v for k, v in tree.items() if k not in ("file", "image", "children")}
    if driver in QUORUM_DRIVERS:
        return _quorum_layer(driver, opts, tree.get("children"))
    if driver in PROTOCOL_DRIVERS:
        if driver == "file" and not isinstance(tree.get("filename"), str):
            raise ImageError("The 'file' block driver requires a file name")
        return Layer(driver, net_options(driver, opts))     # nbd, ssh: their checks
    role = "image" if driver == "blkdebug" else "file"
    child = tree.get(role)
    if child is None:
        raise ImageError(f'A block device must be specified for "{role}"')
    if not isinstance(child, dict):
        raise ImageError(f"Cannot find device='{child}' nor node-name='{child}'")
    return Layer(driver, opts, _layer(child, probe=False))


def _quorum_layer(driver: str, opts: dict[str, Any], children: Any) -> Layer:
    from ..formats.quorum import check_options
    kids = children if isinstance(children, list) else [] if children is None else [children]
    check_options(opts, len(kids))
    layers = []
    for c in kids:
        if not isinstance(c, dict):
            raise ImageError(f"Cannot find device='{c}' nor node-name='{c}'")
        layer = _layer(c, probe=False)
        if layer.driver != "file":
            raise ImageError(f"blkjobs: a quorum child must be a 'file' node, not "
                             f"'{layer.driver}'")
        layers.append(layer)
    return Layer(driver, opts, children=layers)


def _display(top: Layer, tree: dict[str, Any]) -> str:
    """qemu-img's name of the image: the file's name when the options say
    no more than a driver over a file, ``null-co://`` for a bare null-co,
    else ``json:`` with the options that matter (QEMU's key order)."""
    layer: Layer | None = top
    while layer is not None:
        extra = {k for k in layer.opts if k not in _GENERIC and k != "filename"}
        if layer.opts.get("backing", 0) is None:
            extra.discard("backing")
        extra.discard("data-file")      # QEMU names the image by its qcow2 file
        if layer.driver == "null-co" and not extra:
            return "null-co://"
        if layer.driver == "nbd" and extra <= {"server", "export"}:
            return nbd_display(layer.opts) or "json:" + qdict_json(_options(top))
        if layer.driver == "blkdebug" and extra <= {"config"} and layer.child is not None:
            name = blkdebug_display(layer.opts, _display(layer.child, tree))
            return name or "json:" + qdict_json(_options(top))
        if extra or layer.driver not in (*FORMAT_DRIVERS, "file", None):
            break
        if layer.driver == "file":
            return _plain(str(layer.opts["filename"]))
        layer = layer.child
    return "json:" + qdict_json(_options(top))


def _plain(path: str) -> str:
    """A file's name as QEMU shows it: ``./`` before a relative name whose
    first component has a colon (else it would read as a protocol prefix)."""
    return "./" + path if ":" in path.split("/", 1)[0] else path


def _options(layer: Layer) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in layer.opts.items():
        if k in _GENERIC or k.startswith("cache") or k == "backing":
            continue
        if isinstance(v, list):         # QEMU keeps a list's items flattened
            for i, item in enumerate(v):
                for sub, x in (item.items() if isinstance(item, dict) else [("", item)]):
                    out[f"{k}.{i}.{sub}" if sub else f"{k}.{i}"] = x
        else:
            out[k] = v
    out["driver"] = layer.driver or "raw"
    if layer.children:
        out["children"] = [_options(c) for c in layer.children]
    if layer.child is not None:
        out["image" if layer.driver in FILTER_DRIVERS else "file"] = _options(layer.child)
    return out


def _qdict_bucket(key: str) -> int:
    """QEMU's QDict bucket of ``key`` (tdb_hash modulo 512): a QDict lists
    its keys by bucket, so its JSON does too."""
    v = (0x238F13AF * len(key)) & 0xFFFFFFFF
    for i, c in enumerate(key.encode()):
        v = (v + (c << (i * 5 % 24))) & 0xFFFFFFFF
    return ((1103515243 * v + 12345) & 0xFFFFFFFF) % 512


def qdict_json(value: Any) -> str:
    """``value`` as QEMU writes a QDict's JSON (keys in its bucket order;
    the later of two keys in one bucket first)."""
    import json         # here: 2 ms of every command's start-up otherwise
    if isinstance(value, dict):
        keys = sorted(reversed(list(value)), key=_qdict_bucket)
        return "{" + ", ".join(f"{json.dumps(k)}: {qdict_json(value[k])}" for k in keys) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(qdict_json(v) for v in value) + "]"
    return json.dumps(value)


# -- opening -------------------------------------------------------------------------


def open_spec(spec: Spec, read_only: bool = True, with_backing: bool = True,
              header_only: bool = False) -> tuple[Driver, str]:
    """Open ``spec`` as one driver; returns it with its format's name.
    Its ``backing`` option is left on the driver for :func:`.chain.open_chain`:
    ``no_backing`` (null), ``backing_spec`` (options: a json: name),
    ``backing_ref`` (a node's name, which never exists here). Without
    ``with_backing`` (qemu-img info opens no backing file) only null is
    taken, as qemu-img takes it. ``header_only``: an encrypted image opens
    for its header, its key not looked up (qemu-img info's no-I/O open)."""
    backing = spec.top.opts.get("backing", None)
    if backing is not None and not with_backing:
        key = "backing"
        if isinstance(backing, dict) and backing:
            key += "." + sorted(reversed(list(backing)), key=_qdict_bucket)[0]
        raise ImageError(f"Block format '{spec.top.driver or 'raw'}' does not support the "
                         f"option '{key}'")
    drv = take_probed(spec.name, read_only) or _open(spec.top, read_only, header_only)
    drv.filename = spec.display
    if "backing" in spec.top.opts:
        if isinstance(backing, dict):
            drv.backing_spec = "json:" + qdict_json(backing)
        elif backing is not None:
            drv.backing_ref = str(backing)
        drv.no_backing = True  # not the header's
    drv.spec_name = spec.name  # to reopen it
    layer: Layer | None = spec.top
    while layer is not None:        # qemu-img map names the file holding the data
        if layer.driver == "file":
            drv.map_filename = _plain(str(layer.opts["filename"]))
        if layer.driver in FILTER_DRIVERS and layer is not spec.top:
            drv.disk_size_unknown = True  # qemu-img: unavailable
        layer = layer.child
    return drv, drv.format_name


def _open(layer: Layer, read_only: bool, header_only: bool = False) -> Driver:
    d = layer.driver
    if d in QUORUM_DRIVERS:        # bare: its elected file, as raw bytes
        drv = _open_quorum(layer, "raw", read_only)
        drv.format_name = "quorum"
        return drv
    if d in FILTER_DRIVERS:
        assert layer.child is not None
        inner = _open(layer.child, read_only)
        return _filter(layer, inner, above=True)
    if d in PROTOCOL_DRIVERS:
        return _open_protocol(layer, "file", read_only)
    assert layer.child is not None
    below = layer.child
    filters: list[Layer] = []
    while below.driver in FILTER_DRIVERS:       # a filter between format and file
        filters.append(below)
        assert below.child is not None
        below = below.child
    if below.driver in QUORUM_DRIVERS:
        drv = _open_quorum(below, d, read_only)
        for f in reversed(filters):
            drv = _filter(f, drv)
        return drv
    _bind_key(layer, below)
    drv = _open_protocol(below, d, read_only, _data_file(layer), header_only)
    if d == "raw" and ("offset" in layer.opts or "size" in layer.opts):
        from ..formats.slice import Slice
        drv = Slice(drv, _size(layer.opts.get("offset", 0), "offset"),
                    None if "size" not in layer.opts else _size(layer.opts["size"], "size"))
    for f in reversed(filters):
        drv = _filter(f, drv)
    return drv


def _open_quorum(layer: Layer, fmt: str | None, read_only: bool) -> Driver:
    """The format ``fmt`` (None: probed; a bare quorum: raw) over the child
    the quorum elects (:func:`blkjobs.formats.quorum.elect`)."""
    from ..formats.quorum import check_options, disk_size, elect
    if not read_only:
        raise ImageError("blkjobs opens a quorum read-only")
    paths = [str(c.opts["filename"]) for c in layer.children]
    path = elect(paths, check_options(layer.opts, len(paths)))
    drv = _open_protocol(Layer("file", {"filename": path}), fmt, read_only)
    drv.quorum_disk_size = disk_size(paths)
    drv.no_dirname = True  # backing names: unresolvable
    return drv


def _bind_key(layer: Layer, below: Layer) -> None:
    """An encrypted image's secret named in its options (luks ``key-secret``,
    qcow2 ``encrypt.key-secret``): the file opens with it
    (``formats.secrets.bind_key``)."""
    enc = layer.opts.get("encrypt")
    sid = layer.opts.get("key-secret") if layer.driver == "luks" else \
        enc.get("key-secret") if isinstance(enc, dict) else None
    if sid is not None and below.driver == "file":
        from ..formats.secrets import bind_key
        bind_key(str(below.opts["filename"]), str(sid))


def _data_file(layer: Layer) -> str | None:
    """The file a qcow2 layer's ``data-file`` option names (a file node, or
    raw over one); blkjobs opens no other kind of data file."""
    ref = layer.opts.get("data-file")
    if ref is None:
        return None
    if isinstance(ref, str):
        raise ImageError(f"Cannot find device='{ref}' nor node-name='{ref}'")
    node = ref.get("file") if ref.get("driver") == "raw" else ref
    if not isinstance(node, dict) or node.get("driver", "file") != "file" \
            or not isinstance(node.get("filename"), str) or (node is not ref and set(ref) - {"driver", "file"}):
        raise ImageError("blkjobs opens an external data file only as a plain file "
                         "(data-file.driver=file)")
    return node["filename"]


def _open_protocol(layer: Layer, fmt: str | None, read_only: bool,
                   data_file: str | None = None, header_only: bool = False) -> Driver:
    """The format ``fmt`` (None: probed; for a bare protocol: none) over the
    protocol ``layer``."""
    from ..formats import open_image, probe_format
    if layer.driver == "null-co":
        from ..formats.null import DEFAULT_SIZE, Null
        if fmt == "qcow2":
            raise ImageError("Image is not in qcow2 format")
        size = _size(layer.opts.get("size", DEFAULT_SIZE), "size")
        drv: Driver = Null(size, _bool(layer.opts.get("read-zeroes", False)), read_only=read_only)
        if fmt == "raw":
            drv.format_name = "raw"
        return drv
    if layer.driver == "ssh":
        return open_ssh(layer)
    if layer.driver == "nbd":
        from ..formats.nbd import Nbd, qmp_uri
        from ..native.nbd import NbdConnectError
        uri = qmp_uri(layer.opts["server"], layer.opts.get("export"))
        if "x-dirty-bitmap" in layer.opts:      # map reads a context's bits (formats.nbd)
            if fmt not in ("file", "raw", None):
                raise ImageError(f"'{uri}': only the raw format is supported over NBD")
            return Nbd(uri, read_only, dirty_bitmap=str(layer.opts["x-dirty-bitmap"]))
        try:
            return open_image(uri, fmt if fmt != "file" else "raw", read_only=read_only)
        except NbdConnectError as e:
            raise ImageError(nbd_connect_failure(layer.opts["server"], e)) from None
    path = str(layer.opts["filename"])
    try:
        if fmt is None:
            fmt = probe_format(path)
        drv = open_image(path, "raw" if fmt == "file" else fmt, read_only=read_only,
                         data_file=data_file, header_only=header_only)
    except FormatOpenError as e:
        raise ImageError(e.reason) from None
    except (ImageError, OSError) as e:
        from ..formats.base import CryptoOpenError
        if isinstance(e, CryptoOpenError):      # the format's words: no file named
            raise ImageError(str(e)) from None
        text = str(e) if isinstance(e, ImageError) else str(e.strerror)
        if text.lower().startswith(f"could not open '{path}': "):
            text = text[len(f"could not open '{path}': "):]
        raise ImageError(f"Could not open '{path}': {text}") from None
    if fmt == "file":
        drv.format_name = "file"
    return drv


def _filter(layer: Layer, inner: Driver, above: bool = False) -> Driver:
    """``layer`` over ``inner``: between a format and its file, or (``above``)
    the top of the name, over a format or a protocol: no format raises its
    events there (the wrapper is told so: ``x-above``)."""
    assert layer.driver is not None
    wrap = filter_wrap(layer.driver)
    if wrap is None:
        inner.close()
        raise ImageError(f"the '{layer.driver}' driver is not available here")
    opts = dict(layer.opts)
    if layer.driver == "blkdebug":
        opts = _blkdebug_opts(opts)
    opts["x-above"] = above
    try:
        return wrap(inner, opts)
    except BaseException:
        inner.close()
        raise


def _size(value: Any, key: str) -> int:
    from ..units import parse_size
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    try:
        n = parse_size(str(value)) if isinstance(value, str) else -1
    except Exception:
        n = -1
    if n < 0:
        raise ImageError(f"Parameter '{key}' expects a non-negative number below 2^64\n"
                         "Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, "
                         "tera-, peta-\nand exabytes, respectively.")
    return n


def _bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if value in ("on", "true", "yes"):
        return True
    if value in ("off", "false", "no"):
        return False
    raise ImageError("Parameter 'read-zeroes' expects 'on' or 'off'")


# -- blkdebug's config file ----------------------------------------------------------


def _blkdebug_opts(opts: dict[str, Any]) -> dict[str, Any]:
    """The rules of a blkdebug layer: its config file's, then its own
    (typed as QMP gives them)."""
    inject: list[dict[str, Any]] = []
    set_state: list[dict[str, Any]] = []
    config = opts.pop("config", None)
    if config:
        for section, rule in read_blkdebug_config(str(config)):
            (inject if section == "inject-error" else set_state).append(rule)
    inject += [_typed(r) for r in opts.pop("inject-error", [])]
    set_state += [_typed(r) for r in opts.pop("set-state", [])]
    out = {k: v for k, v in opts.items() if k in ("inject-error", "set-state")}
    out["inject-error"], out["set-state"] = inject, set_state
    return out


_INT_KEYS = ("errno", "sector", "state", "new_state")


def _typed(rule: Any) -> dict[str, Any]:
    if not isinstance(rule, dict):
        raise ImageError("Invalid parameter type for 'inject-error', expected: object")
    out: dict[str, Any] = {}
    for k, v in rule.items():
        k = k.replace("-", "_") if k == "new-state" else k
        if k in _INT_KEYS and isinstance(v, str):
            try:
                v = int(v, 0)
            except ValueError:
                raise ImageError(f"Parameter '{k}' expects a number") from None
        elif k == "once" and isinstance(v, str):
            v = _bool(v)
        out[k] = v
    return out


def read_blkdebug_config(path: str) -> list[tuple[str, dict[str, Any]]]:
    """The rules of blkdebug's config file: ``(section, rule)`` in order."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise ImageError(f"Could not read blkdebug config file: {e.strerror}") from None
    import re       # here: not at every command's start
    rules: list[tuple[str, dict[str, Any]]] = []
    current: dict[str, Any] | None = None
    for line in lines:
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = re.fullmatch(r"\[\s*([A-Za-z-]+)\s*\]", line)
        if m:
            if m.group(1) not in ("inject-error", "set-state"):
                raise ImageError(f"Could not read blkdebug config file: unknown section "
                                 f"'{m.group(1)}'")
            current = {}
            rules.append((m.group(1), current))
            continue
        m = re.fullmatch(r'([A-Za-z_-]+)\s*=\s*"?(.*?)"?', line)
        if m is None or current is None:
            raise ImageError("Could not read blkdebug config file: Invalid argument")
        current[m.group(1)] = m.group(2)
    return [(s, _typed(r)) for s, r in rules]
