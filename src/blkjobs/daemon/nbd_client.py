"""``blockdev-add`` of an ``nbd`` node in ``blkjobs serve``: QEMU's arguments
(``server``: ``{"type": "unix", "path"}`` or ``{"type": "inet", "host",
"port"}``, ``export``, ``open-timeout``, ``reconnect-delay``), opened with the ``nbd`` driver of
:mod:`blkjobs.formats.nbd`. The node is a protocol node as in QEMU (``drv``
``nbd``, no file node below it); jobs use it directly as a source or target.

A ``qcow2`` node over an ``nbd`` node (``file``: its name or an inline
``nbd`` definition), as QEMU stacks them, opens read-only
(:mod:`blkjobs.formats.nbd_qcow2`) on the nbd node's connections; its
backing is given as ``backing`` (a node name, or null) -- a backing file
named in the image is not opened over NBD.

Not supported, refused with one line: ``tls-creds`` (blkjobs serve has no
``object-add`` for credentials objects; the command line's ``nbds://`` URIs
take a certificates directory), ``x-dirty-bitmap``.
"""
from __future__ import annotations

import os
from typing import Any

from ..errors import BlkjobsError
from ..graph import Node
from .protocol import QMPError


def open_node(cmds: Any, opts: dict[str, Any], ro: bool) -> Node:
    """The graph node of a ``blockdev-add`` of driver ``nbd`` (held open)."""
    from ..formats.nbd import Nbd, qmp_uri
    if "tls-creds" in opts:
        raise QMPError(f"No TLS credentials with id '{opts['tls-creds']}'")
    if "x-dirty-bitmap" in opts:
        raise QMPError("blkjobs does not support 'x-dirty-bitmap' for driver 'nbd'")
    name = opts.get("node-name")
    if name is not None:
        cmds._check_new_name(name)
    from ..native.nbd import NbdConnectError
    timeout = opts.get("open-timeout") or None
    server = opts["server"]
    try:
        uri = qmp_uri(server, opts.get("export"))
        drv = Nbd(uri, read_only=ro, timeout=float(timeout) if timeout else None,
                  reconnect_delay=float(opts.get("reconnect-delay", 0)))
    except NbdConnectError as e:
        if not e.socket:
            raise QMPError(str(e)) from None
        addr = server.get("path") if server.get("type") == "unix" else \
            f"{server.get('host')}:{server.get('port')}"
        raise QMPError(f"Failed to connect to '{addr}': {os.strerror(e.errno)}") from None
    except BlkjobsError as e:
        raise QMPError(str(e)) from None
    return cmds.eng.graph.add(drv, name, "nbd").hold_open()


def qcow2_node(cmds: Any, nbd_node: Node | None, opts: dict[str, Any], name: str | None,
               ro: bool) -> Node:
    """The graph node of a ``blockdev-add`` of driver ``qcow2`` whose file is
    the nbd node ``nbd_node`` (read-only; the caller attaches ``backing``)."""
    from ..formats.nbd_qcow2 import NbdQcow2
    assert nbd_node is not None
    if not ro:
        raise QMPError("blkjobs opens qcow2 over NBD read-only: add the node with "
                       "\"read-only\": true")
    if "data-file" in opts:
        raise QMPError("blkjobs does not support 'data-file' for qcow2 over NBD")
    try:
        drv = NbdQcow2(nbd_node.driver, owns_nbd=False)
    except BlkjobsError as e:
        raise QMPError(str(e).replace(f"Could not open '{nbd_node.driver.uri}': ", "")) from None
    if drv.backing_filename and opts.get("backing", ...) is ...:
        drv.close()
        raise QMPError(f"'{drv.filename}' has a backing file: blkjobs opens none over NBD "
                       "(give 'backing': a node name, or null)")
    gnode = cmds.eng.graph.add(drv, name, "qcow2")
    if opts.get("backing", ...) is ...:        # else taken with the backing attached
        gnode.hold_open()
    return gnode
