"""``blkjobs bench``: throughput of local disks and copy paths.

Layers, importing one way: ``matrix`` (what to measure) and ``stats`` (how to
summarize) know nothing of I/O; ``runner`` drives the C loops of
``blkjobs.native.ioloop``, the copy engine and the external tools;
``report`` and ``plot`` turn rows into a table, JSON or a PNG;
``progress`` draws the stderr line. The method is explained in
benchmarks/README.md.
"""
