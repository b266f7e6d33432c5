"""Errors for programs: with ``--output json`` (info, map, check, measure) a
failing command prints, besides qemu-img's line on stderr, one JSON object on
stdout -- where its JSON result would have been -- e.g.
``{"error": {"class": "CopyError", "exit-code": 1, "errno": "ENOENT", "side":
"source", "offset": null, "path": "a.qcow2", "message": "..."}}``."""
from __future__ import annotations

import errno as _errno
import json
import sys


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


def print_if_json(args, e: BaseException, exit_code: int) -> None:
    """The JSON object on stdout when the command was asked for ``--output json``."""
    if getattr(args, "output", None) != "json":
        return
    sys.stdout.write(json.dumps(error_object(e, exit_code), indent=4) + "\n")
    sys.stdout.flush()
