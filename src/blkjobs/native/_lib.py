"""The one importer of the compiled extension ``blkjobs._core``.

Every C function returns 0 (or a count) or ``-errno``; :func:`ensure` is the
single choke point that turns a negative code into a :class:`BlkjobsError`.
Nothing outside ``blkjobs.native`` touches ``ffi``/``lib`` or a cffi type.
"""
from __future__ import annotations

import abc

from ..errors import from_errno

try:
    from .._core import ffi, lib  # noqa: F401  (compiled by setup.py / cffi; typed by _core.pyi)
except ImportError as exc:  # pragma: no cover - only without a build
    raise ImportError(
        "blkjobs._core is not built: run 'make venv' (or 'pip install -e .') first"
    ) from exc


def ensure(rc: int, what: str = "", path: str | None = None, side: str | None = None,
           offset: int | None = None) -> int:
    """Return ``rc`` when it is >= 0, else raise the matching BlkjobsError."""
    if rc < 0:
        raise from_errno(rc, what, path=path, side=side, offset=offset)
    return rc


class Owned(abc.ABC):
    """Base of the wrappers that own one C object: ``close()`` frees it (once,
    idempotent); a context manager; freed at garbage collection otherwise."""

    @abc.abstractmethod
    def close(self) -> None:
        """Free the C object; calling it again does nothing."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass
