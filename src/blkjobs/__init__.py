"""blkjobs: QEMU-style block jobs and image tools with a C data path.

The public library API is what this package exports (``__all__``)::

    from blkjobs import Engine, JobOutcome, SyncMode, errors

* :class:`Engine` -- one block graph, its jobs and front ends (``blkjobs.engine``);
* what its methods hand back and a caller holds: :class:`Node` (``open``,
  ``create``), :class:`Job` and its :class:`JobStatus`/:class:`JobOutcome`
  (``backup``, ``wait_job``), :class:`Frontend` (``attach``),
  :class:`DirtyBitmap` (``bitmap``), :class:`Event` and
  :class:`EventListener` (``listen``);
* the options that are enumerations (:mod:`blkjobs.options`):
  :class:`SyncMode`, :class:`CopyMode`, :class:`BitmapMode`,
  :class:`ErrorPolicy`, :class:`OnCbwError`, :class:`CacheMode`,
  :class:`CompletionMode` -- each also accepted as its QMP string;
* :mod:`errors` -- the exception tree, rooted at ``errors.BlkjobsError``.

Everything else (the subpackages ``native``, ``formats``, ``graph``, ``job``,
``jobs``, ``imageops``, ``cli``, ``daemon``, ``bench``) is internal and may
change without notice. The names are imported on first use, so that
``import blkjobs`` (and ``blkjobs --version``) stays cheap.
"""
from __future__ import annotations

__version__ = "0.1.0"

#: public name -> the module that defines it
_EXPORTS = {
    "Engine": "blkjobs.engine",
    "DirtyBitmap": "blkjobs.graph.io",
    "Frontend": "blkjobs.graph.frontend",
    "Node": "blkjobs.graph.node",
    "Job": "blkjobs.jobmodel.job",
    "JobOutcome": "blkjobs.jobmodel.job",
    "JobStatus": "blkjobs.jobmodel.status",
    "Event": "blkjobs.jobmodel.events",
    "EventListener": "blkjobs.jobmodel.events",
    "SyncMode": "blkjobs.options",
    "CopyMode": "blkjobs.options",
    "BitmapMode": "blkjobs.options",
    "ErrorPolicy": "blkjobs.options",
    "OnCbwError": "blkjobs.options",
    "CacheMode": "blkjobs.options",
    "CompletionMode": "blkjobs.options",
}

__all__ = sorted(_EXPORTS) + ["errors", "__version__"]

TYPE_CHECKING = False    # typing.TYPE_CHECKING without importing typing (~5 ms)
if TYPE_CHECKING:
    from . import errors as errors
    from .graph.node import Node as Node
    from .jobmodel.events import Event as Event
    from .jobmodel.events import EventListener as EventListener
    from .jobmodel.job import Job as Job
    from .jobmodel.job import JobOutcome as JobOutcome
    from .jobmodel.status import JobStatus as JobStatus
    from .engine import Engine as Engine
    from .graph.frontend import Frontend as Frontend
    from .graph.io import DirtyBitmap as DirtyBitmap
    from .options import BitmapMode as BitmapMode
    from .options import CacheMode as CacheMode
    from .options import CompletionMode as CompletionMode
    from .options import CopyMode as CopyMode
    from .options import ErrorPolicy as ErrorPolicy
    from .options import OnCbwError as OnCbwError
    from .options import SyncMode as SyncMode


def __getattr__(name: str) -> object:
    from importlib import import_module
    if name == "errors":
        return import_module("blkjobs.errors")
    mod = _EXPORTS.get(name)
    if mod is None:
        raise AttributeError(f"module 'blkjobs' has no attribute {name!r}")
    value = getattr(import_module(mod), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) - {"TYPE_CHECKING"} | set(__all__))
