"""Block jobs (backup, mirror, stream, commit) and the library API.

* :class:`Engine` (:mod:`.engine`) -- the public face: nodes, front ends,
  jobs by the spec's option names, transactions, verbs, queries, events;
* :class:`Frontend` (:mod:`.frontend`) -- live I/O on a node while jobs run;
* :mod:`.base` -- the data path shared by all jobs (C copy engine feeding);
* :mod:`.backup` + :mod:`.cbw`, :mod:`.mirror`, :mod:`.stream`,
  :mod:`.commit` -- the job drivers;
* :mod:`.blkdebug` -- a fault-injection node for error-policy tests.
"""
from .blkdebug import Rule
from .engine import DirtyBitmap, Engine
from .frontend import Filter, Frontend

__all__ = ["DirtyBitmap", "Engine", "Filter", "Frontend", "Rule"]
