"""blkjobs serve [--socket PATH] [--tcp HOST:PORT] [--chardev ...] [--monitor ...]
[--blockdev OPTIONS] [--print-ready] [--pidfile PATH]

A QMP daemon in the manner of ``qemu-storage-daemon``: management software
connects with any QMP client (e.g. ``qemu.qmp``) and drives block nodes,
jobs, dirty bitmaps and transactions (see ``daemon/``). Monitors:

* ``--socket PATH``: a UNIX socket (created; removed at exit);
* ``--tcp HOST:PORT``: TCP, loopback addresses only (QMP has no
  authentication); port 0 picks a free port (see ``--print-ready``);
* ``--chardev socket,id=ID,path=PATH[,server=on,wait=off]`` (or
  ``host=H,port=P``) with ``--monitor chardev=ID``: qemu-storage-daemon's
  spelling of the same.

``--export NODE=IMAGE[,writable][,discard=unmap]`` (repeatable) opens IMAGE
(qcow2 or raw, by its magic) as node NODE (``discard=unmap``: a client's
TRIM discards, else it is ignored, as qemu-nbd's ``--discard``) and exports
it over NBD under the name NODE, on
the server ``--nbd-socket PATH`` or ``--nbd-tcp HOST:PORT`` starts
(``--print-ready`` then says ``"nbd-port"``).

``--blockdev`` (repeatable) adds a node before serving, as JSON or as
QEMU's dotted key=value form (``driver=qcow2,node-name=d,file.driver=file,
file.filename=d.qcow2``). Nothing is printed on stdout except, with
``--print-ready``, one JSON line once every socket listens:
``{"ready": true, "sockets": [...], "tcp-ports": [...]}``. SIGTERM, SIGINT
or the ``quit`` command stop the daemon: running jobs are cancelled, images
closed, exit status 0.
"""
from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import sys

from ..errors import UsageError

_BOOLS = {"on": True, "off": False, "true": True, "false": False}
_BOOL_KEYS = {"read-only", "auto-read-only", "force-share", "lazy-refcounts", "drop-cache"}


def register(sub):
    p = sub.add_parser("serve", help="QMP daemon (qemu-storage-daemon style)",
                       description="Serve QMP on UNIX/loopback TCP sockets: block nodes, "
                                   "jobs, dirty bitmaps and transactions.")
    p.add_argument("--socket", action="append", default=[], metavar="PATH",
                   help="UNIX socket path of a QMP monitor (repeatable)")
    p.add_argument("--tcp", action="append", default=[], metavar="HOST:PORT",
                   help="loopback TCP address of a QMP monitor (repeatable; port 0 = any)")
    p.add_argument("--chardev", action="append", default=[], metavar="OPTS",
                   help="socket,id=ID,path=PATH|host=H,port=P (used by --monitor)")
    p.add_argument("--monitor", action="append", default=[], metavar="chardev=ID",
                   help="a QMP monitor on a --chardev")
    p.add_argument("--blockdev", action="append", default=[], metavar="OPTIONS",
                   help="add a node at start (JSON or dotted key=value)")
    p.add_argument("--export", action="append", default=[], metavar="NODE=IMAGE[,writable][,discard=unmap]",
                   help="open IMAGE as node NODE and export it over NBD as NODE "
                        "(needs --nbd-socket or --nbd-tcp; repeatable)")
    p.add_argument("--nbd-socket", metavar="PATH",
                   help="start the NBD server on this UNIX socket")
    p.add_argument("--nbd-tcp", metavar="HOST:PORT",
                   help="start the NBD server on this TCP address (no TLS: mind who can "
                        "reach it)")
    p.add_argument("--print-ready", action="store_true",
                   help="print one JSON line on stdout once listening")
    p.add_argument("--pidfile", metavar="PATH", help="write the process id here")
    from .main import add_log_options
    add_log_options(p)
    p.set_defaults(func=run)


def parse_keyval(text: str) -> dict:
    """QEMU's dotted key=value syntax (``,,`` escapes a comma) -> nested dict."""
    out: dict = {}
    parts, cur, i = [], "", 0
    while i < len(text):
        if text[i] == ",":
            if text[i + 1:i + 2] == ",":
                cur += ","
                i += 2
                continue
            parts.append(cur)
            cur = ""
        else:
            cur += text[i]
        i += 1
    parts.append(cur)
    for part in parts:
        if not part:
            continue
        if "=" not in part:
            raise UsageError(f"invalid option '{part}' (expected key=value)")
        key, value = part.split("=", 1)
        d = out
        *path, last = key.split(".")
        for k in path:
            d = d.setdefault(k, {})
            if not isinstance(d, dict):
                raise UsageError(f"option '{key}' conflicts with another one")
        val: object = value
        if last in _BOOL_KEYS and value in _BOOLS:
            val = _BOOLS[value]
        d[last] = val
    return out


def parse_blockdev(text: str) -> dict:
    text = text.strip()
    if text.startswith("{"):
        try:
            opts = json.loads(text)
        except ValueError as e:
            raise UsageError(f"--blockdev: invalid JSON: {e}") from None
        if not isinstance(opts, dict):
            raise UsageError("--blockdev: expected a JSON object")
        return opts
    return parse_keyval(text)


def parse_tcp(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise UsageError(f"--tcp: expected HOST:PORT, got '{text}'")
    host = host.strip("[]") or "127.0.0.1"
    if host == "localhost":
        host = "127.0.0.1"
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise UsageError(f"--tcp: '{host}' is not a loopback address (QMP has no "
                         "authentication: only 127.0.0.1 or ::1 are allowed)")
    return host, int(port)


def monitors(args) -> tuple[list[str], list[tuple[str, int]]]:
    unix = list(args.socket)
    tcp = [parse_tcp(t) for t in args.tcp]
    chardevs = {}
    for spec in args.chardev:
        kind, _, rest = spec.partition(",")
        if kind != "socket":
            raise UsageError(f"--chardev: only 'socket' chardevs are supported, got '{kind}'")
        opts = parse_keyval(rest)
        if "id" not in opts:
            raise UsageError("--chardev: 'id' is missing")
        chardevs[opts["id"]] = opts
    for spec in args.monitor:
        opts = parse_keyval(spec if "=" in spec else f"chardev={spec}")
        cd = chardevs.get(opts.get("chardev", ""))
        if cd is None:
            raise UsageError(f"--monitor: chardev '{opts.get('chardev')}' not found")
        if opts.get("mode", "control") != "control":
            raise UsageError("--monitor: only mode=control is supported")
        if "path" in cd:
            unix.append(cd["path"])
        elif "host" in cd and "port" in cd:
            tcp.append(parse_tcp(f"{cd['host']}:{cd['port']}"))
        else:
            raise UsageError("--chardev: 'path' or 'host' and 'port' is required")
    if not unix and not tcp:
        raise UsageError("no monitor: give --socket PATH, --tcp HOST:PORT or "
                         "--chardev/--monitor")
    return unix, tcp


def parse_export(text: str) -> tuple[str, str, bool, bool]:
    """``NODE=IMAGE[,writable][,discard=unmap]`` -> (node, image, writable,
    unmap)."""
    node, sep, image = text.partition("=")
    flags = set()
    while f := next((f for f in (",writable", ",discard=unmap") if image.endswith(f)), ""):
        flags.add(f)
        image = image[:-len(f)]
    if not sep or not node or not image:
        raise UsageError("--export: expected NODE=IMAGE[,writable][,discard=unmap], "
                         f"got '{text}'")
    return node, image, ",writable" in flags, ",discard=unmap" in flags


def _export_blockdev(node: str, image: str, writable: bool, unmap: bool) -> dict:
    try:
        with open(image, "rb") as f:
            fmt = "qcow2" if f.read(4) == b"QFI\xfb" else "raw"
    except OSError as e:
        raise UsageError(f"--export: could not open '{image}': {e.strerror}") from None
    return {"driver": fmt, "node-name": node, "read-only": not writable,
            "discard": "unmap" if unmap else "ignore",
            "file": {"driver": "file", "filename": image, "read-only": not writable}}


def _nbd_startup(args, exports: list[tuple[str, str, bool, bool]]):
    """What runs once the loop serves: the NBD server and the exports."""
    if not exports and not args.nbd_socket and not args.nbd_tcp:
        return None
    if args.nbd_socket and args.nbd_tcp:
        raise UsageError("--nbd-socket and --nbd-tcp: give one of them")
    if args.nbd_socket:
        addr = {"type": "unix", "data": {"path": args.nbd_socket}}
    elif args.nbd_tcp:
        host, sep, port = args.nbd_tcp.rpartition(":")
        if not sep or not port.isdigit():
            raise UsageError(f"--nbd-tcp: expected HOST:PORT, got '{args.nbd_tcp}'")
        addr = {"type": "inet", "data": {"host": host.strip("[]") or "0.0.0.0", "port": port}}
    else:
        raise UsageError("--export needs --nbd-socket PATH or --nbd-tcp HOST:PORT")

    def startup(cmds) -> None:
        from ..daemon.protocol import QMPError
        try:
            cmds.run("nbd-server-start", {"addr": addr})
            for node, _image, writable, _unmap in exports:
                cmds.run("block-export-add", {"type": "nbd", "id": node, "node-name": node,
                                              "writable": writable})
        except QMPError as e:
            raise UsageError(f"--export: {e.desc}") from None
    return startup


def run(args) -> int:
    from ..daemon.protocol import QMPError
    from ..daemon.schema import check_arguments
    from ..daemon.server import serve
    from ..engine import Engine

    unix, tcp = monitors(args)
    blockdevs = [parse_blockdev(b) for b in args.blockdev]
    exports = [parse_export(e) for e in args.export]
    startup = _nbd_startup(args, exports)
    blockdevs += [_export_blockdev(*e) for e in exports]
    from ..daemon.commands import Commands
    eng = Engine()
    cmds = Commands(eng)
    try:
        for opts in blockdevs:
            try:
                check_arguments("blockdev-add", opts)
                cmds.run("blockdev-add", opts)
            except QMPError as e:
                what = "--export" if opts in blockdevs[len(args.blockdev):] else "--blockdev"
                raise UsageError(f"{what}: {e.desc}") from None
    except BaseException:
        eng.close()
        raise
    for path in unix:
        if os.path.exists(path) and not os.path.isdir(path):
            os.unlink(path)     # a stale socket of a previous run

    def ready(server) -> None:
        if args.pidfile:
            # mode 0600 whatever the umask, as QEMU's pid file
            fd = os.open(args.pidfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with open(fd, "w") as f:
                os.fchmod(fd, 0o600)
                f.write(f"{os.getpid()}\n")
        if args.print_ready:
            ready_info = {"ready": True, "sockets": unix, "tcp-ports": server.tcp_ports()}
            port = server.commands.nbd_port()
            if port is not None:
                ready_info["nbd-port"] = port
            sys.stdout.write(json.dumps(ready_info) + "\n")
            sys.stdout.flush()

    try:
        asyncio.run(serve(eng, unix, tcp, ready=ready, commands=cmds, exiting=True,
                          startup=startup))
    finally:
        for path in unix:
            try:
                os.unlink(path)
            except OSError:
                pass
        if args.pidfile:
            try:
                os.unlink(args.pidfile)
            except OSError:
                pass
    return 0
