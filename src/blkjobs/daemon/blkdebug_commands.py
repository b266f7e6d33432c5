"""``blkdebug`` over QMP: QEMU's ``blockdev-add`` syntax for fault
injection, and blkjobs' own commands for break points.

**Nodes.** QEMU's blkdebug is a filter node over an ``image`` child. Two
layouts are accepted (docs/qmp.md §"blkdebug"):

* *under a format node*, as QEMU's own tests set it up::

    {"driver": "qcow2", "node-name": "tgt",
     "file": {"driver": "blkdebug", "image": {"driver": "file", "filename": "t.qcow2"},
              "inject-error": [{"event": "write_aio", "errno": 5, "once": true}]}}

  The blkdebug node (named or ``#blockN``) is a protocol-level node of the
  monitor, like a ``file`` node; the rules act on the format node's I/O,
  which is where QEMU's qcow2 raises ``write_aio``, ``cluster_alloc``,
  ``read_aio``, ``flush_to_os``... on its file child;
* *over a format node defined inline* (``image`` a ``qcow2``/``raw`` object
  without a node-name): blkjobs has one graph node per image, so the image
  is opened *under the blkdebug node's name* and that node is the one jobs
  use. ``query-named-block-nodes`` then shows it with the image's driver,
  and it raises our events (``write_aio`` included, which QEMU's blkdebug
  above a format node would not see).

**Rules**, with QEMU's semantics (block/blkdebug.c; the rule engine and
the driver wrapper are the library's :mod:`blkjobs.jobs.blkdebug_qemu`,
reached through ``Engine.blkdebug_qemu``; this module parses QMP): the node has a state,
1 at first. An event (one of :data:`~blkjobs.jobs.blkdebug.RULE_EVENTS`, the ones
blkjobs raises) processes the rules listed for it whose ``state`` is 0 or the
current state: each ``set-state`` rule moves the state (once all rules of
the event are processed); the ``inject-error`` rules become the *active*
ones, replacing those of an earlier event. A request then fails with the
``errno`` (default ``EIO``) of the first active rule whose ``iotype`` (all
but ``block-status`` by default) and ``sector`` (the byte ``sector * 512``
inside the request; default: any) match; a ``once`` rule is then removed.
``sector`` is refused in the first layout: QEMU counts it in the image
file's host offsets, which our rules (on the format node) do not see.
Requests of a job: the whole request is checked as one ``read`` (of the
source layer it reads) and one ``write`` (of the target); front-end writes
of zeroes and discards are ``write-zeroes`` and ``discard``.

Refused, with one line each: ``config`` (a blkdebug config file), the
``align``/``max-*``/``opt-*`` limits, ``take-child-perms`` and
``unshare-child-perms``, and events blkjobs never raises (QEMU's qcow2
metadata events such as ``l2_update``: accepting them would make a test
silently inject nothing).

**Break points** (QEMU has no QMP command for them: its tests use qemu-io's
``break``/``wait_break``/``resume``/``remove_break`` through HMP, which
qemu-storage-daemon does not have): ``x-blkjobs-blkdebug-break {node,
event, tag}``, ``x-blkjobs-blkdebug-wait-break {tag, *timeout}`` (blocks
the monitor until a request is suspended at ``tag``, ``timeout`` seconds at
most, default 60; returns ``{tag, event, node, offset, length}``; events
keep flowing meanwhile), ``x-blkjobs-blkdebug-resume {tag}`` and
``x-blkjobs-blkdebug-remove-break {tag}``, mapped onto the Engine's break
points (``Engine.blkdebug_break`` ...). ``node`` may be a format node or a
blkdebug node of the first layout (its format node is meant).
"""
from __future__ import annotations

import errno as _errno
from collections.abc import Callable
from typing import Any

from ..errors import UsageError
from ..engine import DEFAULT_IOTYPES, InjectRule, QemuRules, SetStateRule
from ..engine import blkdebug_rule_event as rule_event
from .protocol import QMPError

_UNSUPPORTED = ("config", "align", "max-transfer", "opt-write-zero", "max-write-zero",
                "opt-discard", "max-discard", "take-child-perms", "unshare-child-perms")


def _event(ev: str) -> str:
    try:
        return rule_event(ev)
    except UsageError as e:
        raise QMPError(str(e)) from None


def parse_rules(opts: dict[str, Any]) -> QemuRules:
    for key in _UNSUPPORTED:
        if key in opts:
            raise QMPError(f"blkjobs does not support '{key}' for driver 'blkdebug'")
    inject = []
    for r in opts.get("inject-error", []):
        err = r.get("errno", _errno.EIO)
        if err <= 0:
            raise QMPError(f"blkdebug: errno must be a positive error number, not {err}")
        sector = r.get("sector", -1)
        inject.append(InjectRule(
            _event(r["event"]), r.get("state", 0),
            frozenset((r["iotype"],)) if "iotype" in r else DEFAULT_IOTYPES, err,
            sector * 512 if sector >= 0 else -1, r.get("once", False)))
    set_state = [SetStateRule(_event(r["event"]), r["new_state"], r.get("state", 0))
                 for r in opts.get("set-state", [])]
    return QemuRules(inject, set_state)


def install(eng: Any, gnode: Any, qrules: QemuRules) -> None:
    """Wrap ``gnode``'s driver (break points set later find it a Blkdebug)."""
    eng.blkdebug_qemu(gnode, qrules)


def add(cmds: Any, opts: dict[str, Any], owned: bool) -> Any:
    """``blockdev-add`` of a ``blkdebug`` node (both layouts)."""
    qrules = parse_rules(opts)
    image = opts["image"]
    name = opts.get("node-name")
    if isinstance(image, dict) and image["driver"] in ("qcow2", "raw"):
        if "node-name" in image:
            raise QMPError("blkjobs opens a blkdebug node's image under the blkdebug node's "
                           "name: leave out the image's 'node-name'")
        if name is None:
            raise QMPError("blkjobs: a blkdebug node over a format node needs a node-name")
        mn = cmds._add({**image, "node-name": name}, owned)
        install(cmds.eng, mn.gnode, qrules)
        return mn
    if any(r.offset >= 0 for r in qrules.inject):
        # QEMU counts it in the image file (host offsets of the format node's
        # clusters); our rules see the format node's guest offsets
        raise QMPError("blkjobs does not support 'sector' for a blkdebug node under a "
                       "format node (define the format node inside the blkdebug node)")
    created = []
    if isinstance(image, str):
        img = cmds.nodes.get(image)
        if img is None:
            raise QMPError(f"Cannot find device='{image}' nor node-name='{image}'")
        if img.drv != "file":
            raise QMPError(f"blkjobs puts a blkdebug node only over a 'file' node or an "
                           f"inline format node, not over '{image}' ({img.drv})")
        if img.parent is not None:
            raise QMPError(f"Node '{image}' already has a parent")
    else:
        if image["driver"] != "file":
            raise QMPError(f"blkjobs puts a blkdebug node only over a 'file' node or an "
                           f"inline format node, not over '{image['driver']}'")
        img = cmds._add(image, owned=False)
        created.append(img)
    try:
        if name is not None:
            cmds._check_new_name(name)
        else:
            name = cmds._auto_name()
    except BaseException:
        for c in created:
            cmds._drop(c)
        raise
    mn = type(img)(name, "blkdebug", img.filename, img.read_only, owned)   # a MonitorNode
    mn.file, img.parent = img, mn
    mn.children = created
    mn.qrules = qrules
    cmds.nodes[name] = mn
    return mn


class BlkdebugCommands:
    """The ``x-blkjobs-blkdebug-*`` commands (mixed into Commands)."""

    eng: Any
    nodes: dict
    _lookup: Callable[[str], Any]       # Commands._lookup

    def _break_node(self, name: str) -> Any:
        mn = self.nodes.get(name)
        if mn is not None and mn.drv == "blkdebug" and mn.gnode is None:
            if mn.parent is None or mn.parent.gnode is None:
                raise QMPError(f"blkdebug node '{name}' has no format node above it")
            return mn.parent.gnode
        return self._lookup(name)

    def cmd_x_blkjobs_blkdebug_break(self, node: str, event: str, tag: str) -> dict:
        self.eng.blkdebug_break(self._break_node(node), _event(event), tag)
        return {}

    def cmd_x_blkjobs_blkdebug_wait_break(self, tag: str, timeout: int = 60) -> dict:
        if timeout <= 0:
            raise QMPError("Parameter 'timeout' must be positive")
        try:
            s = self.eng.blkdebug_wait_break(tag, timeout)
        except TimeoutError as e:
            raise QMPError(str(e)) from None
        return {"tag": s.tag, "event": s.event, "node": s.node, "offset": s.offset,
                "length": s.length}

    def cmd_x_blkjobs_blkdebug_resume(self, tag: str) -> dict:
        self.eng.blkdebug_resume(tag)
        return {}

    def cmd_x_blkjobs_blkdebug_remove_break(self, tag: str) -> dict:
        self.eng.blkdebug_remove_break(tag)
        return {}
