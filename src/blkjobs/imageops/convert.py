"""``convert``: copy an image (raw, qcow2, a backing chain) into a new (or
existing, ``-n``) raw or qcow2 image.

Python decides what to copy; the C engine moves the bytes. Per work range
(128 MiB, fed one range ahead so the workers never wait for Python):

* the source's block status through its chain says, per run, which layer
  holds it: DATA runs become engine COPY items reading that layer's file at
  its host offset (``src_fd`` per item), ZERO / unallocated-to-the-bottom runs
  become zero items (or nothing when the target already reads as zeroes),
  COMPRESSED runs are read through the driver into a buffer (chunked);
* a qcow2 target gets its host clusters from ``Qcow2.allocate`` for the
  cluster-aligned runs that hold data (rounded outwards to target clusters),
  and the engine ``pwrite``s at those host offsets. Fresh clusters (past the
  file's old end) read as zeroes; reused ones (``-n``) are punched first, so
  the engine may always skip zeroes inside them (``target_is_zero``): zero
  blocks found inside DATA runs stay holes in the qcow2 file. At the end,
  clusters whose whole host range stayed a hole are discarded again (one
  SEEK_DATA walk over the runs we allocated), so zeroes written as data end
  up unallocated as with qemu-img. On a new target without a backing file
  the clusters of data runs that read as zeroes are found before (one 512-byte
  read per cluster of data: ``convert_zeroes.zero_clusters``) and never
  allocated, as qemu-img decides before it allocates, so the file is as
  long as qemu-img's; with ``-n``, ``-B`` or preallocation they are
  allocated and freed after the copy, free holes inside the file;
* ``-c``: clusters holding data are read through the chain (chunked),
  compressed on ``-m`` threads (deflate, igzip or zlib: a chunk per call of the C core's
  ``bj_deflate_clusters``; zstd: a Python thread pool) and stored in order
  with ``Qcow2.write_compressed``;
* ``-B``: the target records a backing file; when it is the source's own
  backing file only the source's top layer is copied (qemu-img's rule),
  otherwise source and backing are compared chunk by chunk and only target
  clusters that differ are written.

Metadata is flushed once at the end, after every data write completed
(refcounts, L2, L1, header, each fsync'd: ``Qcow2.flush``).

Locks (QEMU's lock bytes, as qemu-img convert takes them): the source and its
backing chain are read with nobody else allowed to write them (``-U``:
shared); the target is written exclusively, locked before anything in it is
touched (an existing file is locked before it is truncated or re-created);
a ``-B`` backing file is read like the source. A target that is in the
source's own backing chain is refused: writing it would change the source.

The code: :mod:`.convert_base` (options, result, the engine loop),
:mod:`.convert_target` (the target: locks, creation, clean-up after a
failure), :mod:`.convert_raw` (raw -> raw), :mod:`.convert_chain` (the rest).
"""
from __future__ import annotations

from ..errors import UsageError
from .convert_base import ConvertOptions, ConvertResult, check_options
from .files import same_file

TYPE_CHECKING = False     # typing.TYPE_CHECKING without importing typing (start-up)
if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["ConvertOptions", "ConvertResult", "convert"]


def convert(src: str, dst: str, opts: ConvertOptions | None = None,
            progress: Callable[[int, int], None] | None = None,
            check: Callable[[], None] | None = None) -> ConvertResult:
    """Convert ``src`` (any supported format, with its backing chain) into
    ``dst``. raw -> raw without -B/-c takes :func:`convert_raw`."""
    from ..formats import is_spec
    from .images import check_format, probe
    o = opts or ConvertOptions()
    check_format(o.dst_fmt, "target")
    check_format(o.src_fmt, "source")
    check_options(o)
    if o.dst_fmt == "raw":
        if o.backing:
            raise UsageError("Backing file not supported for file format 'raw'")
        if o.compress:
            raise UsageError("Compression not supported for this file format (raw)")
        if o.create_opts and set(o.create_opts) - {"preallocation"}:
            raise UsageError(f"Invalid parameter '{sorted(set(o.create_opts) - {'preallocation'})[0]}'")
    if same_file(src, dst):
        raise UsageError(f"source and target are the same file: '{src}'")
    fmt = probe(src, o.src_fmt)
    if fmt == "raw" and o.dst_fmt == "raw" and not o.create_opts and o.snapshot is None \
            and not is_spec(src):
        from .convert_raw import convert_raw    # here: a qcow2 convert does not need it
        return convert_raw(src, dst, o, progress, check)
    from .convert_chain import ChainConvert     # here: raw -> raw does not need it
    return ChainConvert(src, fmt, dst, o, progress, check).run()
