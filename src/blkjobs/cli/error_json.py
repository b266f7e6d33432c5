"""Errors for programs: with the global option ``--error-format json`` a
failing command writes, instead of its one line, one JSON object on stderr,
e.g. ``{"error": {"class": "CopyError", "exit-code": 1, "errno": "ENOENT",
"side": "source", "offset": null, "path": "a.qcow2", "message": "..."}}``.
(Not tied to ``--output json``: qemu-img prints nothing on stdout and its
line on stderr then too, and scripts and QEMU's tests rely on that.)"""
from __future__ import annotations

import errno as _errno
import sys

from .jsonout import dumps


def error_object(e: BaseException, exit_code: int) -> dict:
    """The JSON object of an error (errno from the error or its cause)."""
    num = getattr(e, "errno", None)
    if num is None and isinstance(e.__cause__, OSError):
        num = e.__cause__.errno
    path = getattr(e, "path", None) or getattr(e, "filename", None)
    if isinstance(e, OSError):
        message = e.strerror or str(e)
    else:
        message = str(e)
    return {"error": {"class": type(e).__name__, "exit-code": exit_code,
                      "errno": _errno.errorcode.get(num) if num else None,
                      "side": getattr(e, "side", None), "offset": getattr(e, "offset", None),
                      "path": None if path is None else str(path), "message": message}}


def print_if_json(args, e: BaseException, exit_code: int) -> bool:
    """The JSON object on stderr when ``--error-format json`` was given:
    True when written (the caller then writes no line)."""
    if getattr(args, "error_format", None) != "json":
        return False
    sys.stderr.write(dumps(error_object(e, exit_code)) + "\n")
    sys.stderr.flush()
    return True
