"""The network protocols of qemu-img's image names (:mod:`.blockspec`):
QEMU's legacy NBD address options, ``ssh`` (its options and the connection,
no SSH session), QEMU's texts for a server that cannot be reached, and the
one connection an NBD name gets (a driver opened to find the format is kept
for the open that follows)."""
from __future__ import annotations

from ..errors import ImageError
from ..formats.base import Driver

TYPE_CHECKING = False     # typing.TYPE_CHECKING without importing typing (start-up)
if TYPE_CHECKING:
    from typing import Any


def net_options(driver: str, opts: dict[str, Any]) -> dict[str, Any]:
    """A protocol layer's options as QEMU takes them (``nbd``, ``ssh``:
    their legacy options and refusals; others: as they are)."""
    if driver == "ssh":
        return ssh_options(opts)
    if driver == "nbd":
        opts = nbd_legacy(opts)
        if "server" not in opts:
            raise ImageError("NBD server address missing")
    return opts


def blkdebug_display(opts: dict[str, Any], below: str) -> str | None:
    """``blkdebug:CONFIG:IMAGE``, QEMU's name of a blkdebug node whose image
    has a plain name (None when it has not)."""
    import json
    if below.startswith("json:"):
        return None
    config = opts.get("config", "")
    return f"blkdebug:{config if isinstance(config, str) else json.dumps(config)}:{below}"


def nbd_legacy(opts: dict[str, Any]) -> dict[str, Any]:
    """QEMU's legacy NBD address options ``path``, or ``host`` and ``port``,
    as the ``server`` they stand for (values of any JSON type: as text)."""
    legacy = {k: opts[k] for k in ("path", "host", "port") if k in opts}
    if not legacy:
        return opts
    import json
    out = {k: v for k, v in opts.items() if k not in legacy}
    if "server" in out:
        raise ImageError("Cannot use 'server' and path/host/port at the same time")
    text = {k: v if isinstance(v, str) else json.dumps(v) for k, v in legacy.items()}
    if "path" in text and "host" in text:
        raise ImageError("path and host may not be used at the same time")
    if "path" in text:
        if "port" in text:
            raise ImageError("port may not be used without host")
        out["server"] = {"type": "unix", "path": text["path"]}
    elif "host" in text:
        out["server"] = {"type": "inet", "host": text["host"], "port": text.get("port", "10809")}
    return out


def ssh_options(opts: dict[str, Any]) -> dict[str, Any]:
    """QEMU's ssh options checked in its order: the legacy ``port`` a
    number, ``host``/``port`` as ``server``, then ``path`` required."""
    port = opts.get("port")
    if port is not None and not _qemu_number(port):
        raise ImageError("Parameter 'port' expects a number")
    out = {k: v for k, v in opts.items() if k not in ("host", "port")}
    if "host" not in opts and port is not None:
        raise ImageError("port may not be used without host")
    if "host" in opts:
        import json
        host = opts["host"]
        out["server"] = {"host": host if isinstance(host, str) else json.dumps(host),
                         "port": str(port) if port is not None else "22"}
    if "server" not in out:
        raise ImageError("Parameter 'server' is missing")
    if not isinstance(out["server"], dict) or "host" not in out["server"]:
        raise ImageError("Parameter 'server.host' is missing")
    if "path" not in out:
        raise ImageError("Parameter 'path' is missing")
    return out


def _qemu_number(value: Any) -> bool:
    """What QEMU's number options take: an integer, or text strtoull reads whole."""
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return value >= 0
    if not isinstance(value, str) or value.strip() != value or value.startswith("-"):
        return False
    try:
        int(value, 8 if value[:1] == "0" and value[1:2].isdigit() else 0)
    except ValueError:
        return False
    return True


def open_ssh(layer: Any) -> Driver:
    """The ssh protocol as far as blkjobs goes: the server is connected to,
    with QEMU's words when that fails; an SSH session is not implemented."""
    import socket
    server = layer.opts["server"]
    host, port = str(server.get("host")), str(server.get("port", "22"))
    addr = f"{host}:{port}"
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise ImageError(f"address resolution failed for {addr}: {e.strerror}") from None
    err: OSError | None = None
    for family, kind, proto, _, sa in infos:
        try:
            with socket.socket(family, kind, proto) as sock:
                sock.settimeout(30)
                sock.connect(sa)
            err = None
            break
        except OSError as e:
            err = e
    if err is not None:
        import os
        raise ImageError(f"Failed to connect to '{addr}': "
                         f"{os.strerror(err.errno) if err.errno else err}")
    raise ImageError(f"blkjobs does not speak SSH: '{addr}' answers, but the ssh protocol "
                     "is not supported (file, nbd, null-co)")


def nbd_connect_failure(server: dict[str, Any], e: Any) -> str:
    """QEMU's words for an NBD server that could not be reached (the
    address as its options give it); a failed handshake: libnbd's."""
    import os
    text = str(e).split("': ", 1)[-1]
    if server.get("type") == "unix":
        addr = str(server.get("path"))
    else:
        addr = f"{server.get('host')}:{server.get('port', 10809)}"
        if text.startswith("getaddrinfo: "):
            return f"address resolution failed for {addr}: {text.rsplit(': ', 1)[-1]}"
    if e.socket:
        return f"Failed to connect to '{addr}': {os.strerror(e.errno)}"
    return text


def nbd_display(opts: dict[str, Any]) -> str | None:
    """QEMU's name of an NBD node: its URI (a legacy host/port/path too);
    None for an address it does not name so."""
    from ..formats.nbd import display_name, qmp_uri
    server = opts.get("server")
    if isinstance(server, dict) and server.get("type") in ("inet", "unix"):
        return display_name(qmp_uri(server, opts.get("export")))
    return None


#: drivers opened to find a format, kept for the open that follows (see
#: :func:`keep_probed`)
_kept: dict[str, Driver] = {}


def keep_probed(spec: Any, drv: Driver) -> bool:
    """Keep ``drv`` (``spec`` opened read-only to find its format) for the
    next :func:`open_spec` of the same name when it reaches an NBD server:
    as QEMU, which opens an image once, connect once (a server that serves
    one client, as ``qemu-nbd`` without ``--persistent``, has gone when a
    second connection comes). False: not kept, close it."""
    layer = spec.top
    while layer is not None and layer.driver != "nbd":
        layer = layer.child
    if layer is None:
        return False
    old = _kept.pop(spec.name, None)
    if old is not None:
        old.close()
    _kept[spec.name] = drv
    return True


def take_probed(name: str, read_only: bool) -> Driver | None:
    """The driver :func:`keep_probed` kept for ``name`` (None: none, or it
    was opened read-only and ``read_only`` is not asked: closed)."""
    kept = _kept.pop(name, None)
    if kept is not None and kept.read_only and not read_only:
        kept.close()
        return None
    return kept
