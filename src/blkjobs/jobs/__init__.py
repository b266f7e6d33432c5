"""Block jobs: backup, mirror, stream, commit (drivers of the job core).

Each driver receives the graph's I/O layer (:class:`~blkjobs.graph.io.BlockIO`)
from the facade (:mod:`blkjobs.engine`), which is the only module that imports
them; nothing here imports the facade.

* :mod:`.base` -- :class:`~.base.BlockJob`, what every job driver shares (rate
  limit, error policies, its filter node, the copy loop);
* :mod:`.blockcopy` -- the data path shared by all jobs (``Mover``: feeding
  the C copy engine; QEMU's ``block-copy.c``);
* :mod:`.ranges` -- range algebra, run classifiers, batch unit;
* :mod:`.backup` + :mod:`.cbw`, :mod:`.mirror` + :mod:`.dirty`,
  :mod:`.stream`, :mod:`.commit` -- the job drivers;
* :mod:`.blkdebug` -- a fault-injection driver wrapper for error-policy tests.

This package's ``__init__`` imports nothing (importing a driver module must
not import the others, nor the facade).
"""
