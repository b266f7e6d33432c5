"""The format driver contract.

A driver presents one image file (raw, qcow2, ...) as a virtual disk of
``size`` bytes. Drivers know nothing of backing chains beyond the names
recorded in their headers: the graph layer (``blkjobs.graph``) stacks them and
answers "who provides this byte". Drivers must never copy bulk data in Python
loops: bulk moves go through ``blkjobs.native`` using the host extents that
``map_host`` reports.
"""
from __future__ import annotations

import abc

from ..native.record import Record
from ..errors import ImageError, NotAnImageFile  # noqa: F401  (re-exported: its home was here)
from .cache import open_cached, open_file  # noqa: F401  (the same)

TYPE_CHECKING = False     # typing.TYPE_CHECKING without importing typing (start-up)
if TYPE_CHECKING:
    from collections.abc import Callable    # (collections: not at start-up)
    from typing import Any, Self, TypeAlias


class NotSupported(ImageError):
    """A driver was asked for something its format cannot do (see the
    capabilities of :class:`Driver`)."""


class CryptoOpenError(ImageError):
    """An encrypted image cannot be unlocked (no key, wrong password):
    QEMU's text; the commands prefix ``Could not open 'PATH': ``. Raised by
    formats.luks; here so that catching it does not import the crypto."""


class FormatOpenError(ImageError):
    """A format driver refuses to open the image for a reason of its own
    (``reason``, the text QEMU's format driver gives): the message names
    the image file as qemu-img does for a plain name; opened from options
    (``json:``, ``--image-opts``) qemu-img names only the option string."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"Could not open '{path}': {reason}")
        self.reason = reason


class Kind(int):
    """What a range of the virtual disk is, in this layer alone: an int with
    a ``name``, as the ``enum.IntEnum`` it was (equal to its value, printed
    as ``Kind.DATA``), without building an enum class (~1 M instructions of
    every image command's start-up)."""
    __slots__ = ()

    DATA: Kind          # stored in this layer at host_offset of the driver's file
    ZERO: Kind          # reads as zeroes, decided by this layer
    UNALLOCATED: Kind   # not decided here: read from the backing file (or zeroes)
    COMPRESSED: Kind    # stored compressed: read through the driver, not the host file

    @property
    def name(self) -> str:
        return _KIND_NAMES[self]

    @property
    def value(self) -> int:
        return int(self)

    def __repr__(self) -> str:
        return f"<Kind.{self.name}: {int(self)}>"

    __str__ = int.__repr__      # as IntEnum's: the number


_KIND_NAMES = ("DATA", "ZERO", "UNALLOCATED", "COMPRESSED")
for _v, _n in enumerate(_KIND_NAMES):
    setattr(Kind, _n, Kind(_v))
del _v, _n


class Mapping(Record):
    """One run of the virtual disk, [start, start+length), all of one kind.

    ``host_offset`` is the offset in the driver's file for DATA (a contiguous
    run there), else None. (A plain class, not a dataclass: ``dataclasses``
    imports ``inspect``, ~8 ms of every raw -> raw convert's start-up.)
    """
    __slots__ = ("start", "length", "kind", "host_offset")

    def __init__(self, start: int, length: int, kind: Kind, host_offset: int | None = None):
        self.start = start
        self.length = length
        self.kind = kind
        self.host_offset = host_offset


#: ``fill(guest_offset, buf)``: fills the writable ``buf`` with what lies
#: below the layer being written (the backing chain's view), for the parts of
#: a newly allocated cluster a write does not cover; None: zeroes
Fill: TypeAlias = "Callable[[int, memoryview], None]"


class Driver(abc.ABC):
    """An open image. Subclasses set ``format_name``.

    Attributes every driver provides:

    * ``filename``: the path it was opened from;
    * ``fd``: the OS file descriptor of the (data) file, for the C core (a
      property: after :meth:`close` an error, never a number the OS reuses);
    * ``read_only``: opened without write access;
    * ``backing_filename`` / ``backing_format``: as recorded in the header,
      None when absent (raw: always None);
    * ``cluster_size``: allocation unit in bytes (raw: 0 = none);
    * ``scs``: the smallest allocation unit, the subcluster size of a qcow2
      image with extended L2 entries (else its cluster size; raw: 0);
    * ``extended``: the image has extended L2 entries (qcow2
      ``extended_l2=on``; others: False);
    * ``persistent_bitmaps``: the dirty bitmaps stored in the image (qcow2:
      :class:`blkjobs.formats.qcow2.bitmaps.Bitmaps`), None when the format
      stores none.

    Capabilities are declared, not probed (class attributes; a method whose
    capability is False raises :class:`NotSupported` with a clear text):

    * ``can_allocate``: :meth:`allocate` with an ``undo`` list and
      :meth:`undo_allocate` (qcow2: clusters for the C engine to fill; raw
      needs none, its :meth:`allocate` is the identity);
    * ``can_compress``: :meth:`write_compressed` (qcow2);
    * ``can_set_backing``: :meth:`set_backing` records a backing file in the
      header (qcow2);
    * ``can_check``: :meth:`check`, the consistency check (qcow2);
    * ``has_metadata``: metadata kept in memory that :meth:`flush` writes,
      even with cache=unsafe (:meth:`set_unsafe`; qcow2) -- a raw image
      opened cache=unsafe has nothing to flush;
    * ``injects_faults``: :meth:`inject_check` may fail requests (the
      blkdebug wrapper of :mod:`blkjobs.jobs.blkdebug`);
    * ``host_file``: the data lives in a host file at ``fd`` (the C engine
      copies it by host offsets, QEMU's lock bytes apply). False for a
      remote disk (``protocol`` ``nbd``): ``fd`` is -1, no locks, and the
      bytes move only through :meth:`readinto` and :meth:`write`.
    * ``wants_events``: the job data path raises blkdebug events for this
      driver even without break points (QEMU's blkdebug rules,
      :mod:`blkjobs.jobs.blkdebug_qemu`);
    * ``parallel_reads``: :meth:`readinto` is plain preads that keep no
      state a write changes, so reads may run outside the graph's I/O lock
      and in parallel (raw); False where reads share state (qcow2's L2 cache:
      it offers ``map_for_read`` instead, ``graph/readplan.py``);
    * ``is_filter``: False; the graph's filter nodes have a
      :class:`blkjobs.graph.filter.FilterDriver` (True) instead of an image
      driver;
    * ``has_debug_hook``: the driver raises blkdebug events of its own
      through its ``blkdebug`` hook (qcow2: metadata events, the reads of
      its file), which a blkdebug layer below it sets.

    What callers ask of every driver, declared here with the neutral answer
    (callers use them directly, never ``getattr``/``hasattr``; the blkdebug
    wrapper of :mod:`blkjobs.jobs.blkdebug` forwards them to its driver):

    * ``map_for_read`` / ``read_segments``: a reader's runs mapped outside
      the I/O lock (``graph/readplan.py``; qcow2), None: not offered, read
      through :meth:`readinto`;
    * ``file_length``: the host file's length in bytes when it differs from
      ``size`` by a partial sector (raw), else None;
    * ``data_path``: the external data file's name (qcow2), else None;
    * ``read_zeroes``: an unallocated range with nothing below reads as
      zeroes (False: unknown -- null-co without ``read-zeroes``, an NBD
      export's dirty bitmap);
    * ``disk_size_unknown``: ``info`` shows no ``actual-size``;
    * ``bitmaps``: the image's bitmap directory (qcow2), None or empty when
      it has none; ``bitmaps_loaded``: :attr:`persistent_bitmaps` was
      loaded; :meth:`activate_bitmaps` / :meth:`reopen_bitmaps_ro`: what
      opening read-write / reopening read-only does to them;
    * ``blkdebug``: the blkdebug hook (with ``has_debug_hook``), else None;
    * ``header``: the parsed header of a format that has one, else None;
      ``ctype``: qcow2's compression type (0: deflate);
    * :meth:`backing_read`: told of a read left to the backing file (only a
      driver with ``wants_events``: QEMU's blkdebug rules);
    * :meth:`watch_file_growth`: a callback when metadata allocation grows
      the file (qcow2's refcounts; others: nothing to watch);
    * set on a driver opened from a ``json:``/``--image-opts`` name
      (``graph/blockspec.py``): ``spec_name`` (the name, to reopen it),
      ``map_filename`` (the ``file`` layer's name), ``backing_spec`` /
      ``backing_ref`` / ``no_backing`` (its ``backing`` option),
      ``no_dirname`` and ``quorum_disk_size`` (a quorum's elected child).
    """

    format_name: str = "?"
    can_allocate: bool = False
    can_compress: bool = False
    can_set_backing: bool = False
    can_check: bool = False
    has_metadata: bool = False
    injects_faults: bool = False
    host_file: bool = True
    protocol: str = "file"
    wants_events: bool = False
    is_filter: bool = False
    parallel_reads: bool = False
    #: the guest data is encrypted (luks, qcow2 encrypt.format=luks|aes):
    #: never read or written at host offsets, only through the driver
    encrypted: bool = False
    filename: str
    read_only: bool
    backing_filename: str | None = None
    backing_format: str | None = None
    cluster_size: int = 0
    scs: int = 0
    extended: bool = False
    has_debug_hook: bool = False
    # what callers ask of every driver (see the class docstring)
    data_path: str | None = None
    read_zeroes: bool = True
    disk_size_unknown: bool = False
    bitmaps: list[Any] | None = None
    blkdebug: Any = None
    header: Any = None
    ctype: int = 0
    spec_name: str | None = None
    map_filename: str | None = None
    backing_spec: str = ""
    backing_ref: str | None = None
    no_backing: bool = False
    no_dirname: bool = False
    quorum_disk_size: int | None = None

    @property
    def persistent_bitmaps(self) -> Any:
        """The image's persistent dirty bitmaps, or None (see above)."""
        return None

    @property
    def bitmaps_loaded(self) -> bool:
        """:attr:`persistent_bitmaps` was loaded (never for a format that
        stores none)."""
        return False

    def activate_bitmaps(self) -> None:
        """Once the node holds its locks, read-write: the bitmaps flagged in
        use (qcow2); nothing for a format that stores none."""

    def reopen_bitmaps_ro(self) -> None:
        """Before a reopen read-only: the bitmaps stored now (qcow2);
        nothing for a format that stores none."""

    @property
    def file_length(self) -> int | None:
        """The host file's length in bytes where ``size`` rounds it up to
        whole sectors (raw), else None: ``size`` is the length."""
        return None

    def map_for_read(self, offset: int, length: int) -> list[list] | None:
        """This layer's runs of [offset, offset+length) for a reader that
        reads the DATA runs itself outside the I/O lock (qcow2:
        ``formats/qcow2/mapping.py``); None: not offered, read through
        :meth:`readinto`."""
        return None

    def read_segments(self, reqs: list[tuple[int, int]], unalloc_zero: bool
                      ) -> list[Any] | None:
        """:meth:`map_for_read` of many reads at once for the NBD export's C
        data path (qcow2); None: not offered."""
        return None

    def backing_read(self, offset: int, length: int) -> None:
        """The image reads [offset, offset+length) from its backing file
        (``wants_events``: QEMU's blkdebug rules hear of it); nothing by
        default."""

    def watch_file_growth(self, cb: Callable[[int], None]) -> None:
        """Call ``cb(end)`` when an allocation takes clusters past the end of
        the file (a write threshold on the file; qcow2, writable). Nothing
        to watch by default."""

    @property
    @abc.abstractmethod
    def fd(self) -> int:
        """The OS file descriptor of the (data) file."""

    @property
    def data_fd(self) -> int:
        """The descriptor of the file the DATA runs' host offsets point into:
        :attr:`fd`, except for a qcow2 image with an external data file."""
        return self.fd

    @property
    @abc.abstractmethod
    def size(self) -> int:
        """Virtual size in bytes."""

    @abc.abstractmethod
    def map_host(self, offset: int, length: int) -> list[Mapping]:
        """Describe [offset, offset+length) in this layer alone, as adjacent
        Mappings in order that cover the whole range (clipped to ``size``).
        Must be cheap enough to call per work range (e.g. 64-128 MiB)."""

    def host_run(self, offset: int, length: int, for_write: bool = False) -> int | None:
        """The file offset of guest [offset, offset+length) when this layer
        stores it as plain data in one piece -- for_write: data that may be
        overwritten in place -- else None (then ask :meth:`map_host`, or
        ``allocate``). The jobs' fast path for small ranges (a mirror copies
        thousands of scattered granules a second): one lookup, no runs."""
        return None

    @abc.abstractmethod
    def readinto(self, offset: int, buf: bytearray | memoryview) -> None:
        """Fill the writable buffer ``buf`` with this layer's view of
        [offset, offset+len(buf)). UNALLOCATED ranges read as zeroes here:
        the graph layer resolves them through the backing chain first."""

    @abc.abstractmethod
    def write(self, offset: int, data: bytes | bytearray | memoryview,
              fill: Fill | None = None) -> None:
        """Write ``data`` (bytes-like) at ``offset``; allocates as needed
        (``fill``: see :data:`Fill`)."""

    @abc.abstractmethod
    def write_zeroes(self, offset: int, length: int, may_unmap: bool = True,
                     fill: Fill | None = None) -> None:
        """Make the range read as zeroes (and no longer fall through to the
        backing file). qcow2 uses zero clusters where it can (``fill``: for
        the rest of a partly zeroed new cluster, see :data:`Fill`)."""

    @abc.abstractmethod
    def discard(self, offset: int, length: int) -> None:
        """Drop the range: afterwards it may read from backing or as zeroes."""

    @abc.abstractmethod
    def flush(self) -> None:
        """Make everything written so far durable (metadata, then fsync)."""

    @abc.abstractmethod
    def close(self) -> None:
        """Flush (if writable) and release the file. Idempotent."""

    def info(self) -> dict[str, Any]:
        """Format-specific fields for ``info --output json``."""
        return {}

    @property
    def dirty_flag(self) -> bool:
        """The image is marked dirty (qcow2's incompatible dirty bit)."""
        return False

    # -- capabilities (see the class docstring) -----------------------------

    def _unsupported(self, what: str) -> NotSupported:
        return NotSupported(f"'{self.filename}': the {self.format_name} format does not "
                            f"support {what}")

    def allocate(self, offset: int, length: int, undo: list | None = None) -> list[Mapping]:
        """Allocate [offset, offset+length) for writing in place: the host
        runs as DATA Mappings. ``undo`` (``can_allocate``): what the
        allocation changed is appended, for :meth:`undo_allocate`."""
        raise self._unsupported("allocation")

    def allocate_many(self, ranges: list[tuple[int, int]],
                      undo: list | None = None) -> list[Mapping]:
        """:meth:`allocate` of several ranges in increasing order (qcow2
        takes their new clusters in one go)."""
        return [m for o, n in ranges for m in self.allocate(o, n, undo)]

    def undo_allocate(self, undo: list) -> None:
        """Put back what :meth:`allocate` changed (``can_allocate``)."""
        raise self._unsupported("allocation")

    def release_allocated(self, undo: list) -> None:
        """The data of what :meth:`allocate` recorded in ``undo`` is written
        (``can_allocate``; qcow2 holds those entries off the disk until then)."""

    def write_compressed(self, offset: int, cluster_data: bytes | bytearray | memoryview) -> None:
        """Write one cluster compressed (``can_compress``)."""
        raise self._unsupported("compression")

    def set_backing(self, filename: str | None, fmt: str | None) -> None:
        """Record ``filename`` (None: no backing file) in the header
        (``can_set_backing``)."""
        raise self._unsupported("recording a backing file")

    def check(self, repair: str | None = None) -> dict[str, Any]:
        """The consistency check (``can_check``)."""
        raise self._unsupported("checks")

    def set_unsafe(self, unsafe: bool) -> None:
        """cache=unsafe: metadata still written in order, never fsync'ed.
        Drivers without metadata (``has_metadata`` False) have nothing to do."""

    def inject_check(self, op: str, offset: int, length: int) -> int:
        """The errno a request is failed with by fault injection, or 0
        (``injects_faults``)."""
        return 0

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
