"""What a filter node (a job's copy-before-write, mirror_top or copy-on-read
node: :meth:`blkjobs.graph.node.Graph.add_filter`) has in place of an image
driver: names only; its ``file`` child does the I/O."""
from __future__ import annotations

TYPE_CHECKING = False     # typing.TYPE_CHECKING without importing typing (start-up)
if TYPE_CHECKING:
    from typing import Protocol
else:
    Protocol = object    # a plain base at run time: the class is for the type checker


class _Child(Protocol):          # a graph Node (not imported: node imports us)
    @property
    def filename(self) -> str: ...
    @property
    def size(self) -> int: ...
    @property
    def read_only(self) -> bool: ...


class FilterDriver:
    """What a filter node has in place of an image driver: names only."""

    is_filter = True
    wants_events = injects_faults = False
    fd = -1
    data_fd = -1
    cluster_size = 0
    backing_filename = None
    backing_format = None
    #: the neutral answers of the Driver contract that callers ask any node
    #: (formats/base.py): no reopen name, no bitmaps, no file that grows
    spec_name = None

    def __init__(self, format_name: str, child: _Child):
        self.format_name = format_name
        self.child = child

    @property
    def filename(self) -> str:
        return self.child.filename

    @property
    def size(self) -> int:
        return self.child.size

    @property
    def read_only(self) -> bool:
        return self.child.read_only

    def close(self) -> None:
        pass

    def watch_file_growth(self, cb: object) -> None:
        """No file of its own: nothing grows (formats/base.py)."""

    def activate_bitmaps(self) -> None:
        """No bitmaps (formats/base.py)."""

    def reopen_bitmaps_ro(self) -> None:
        """No bitmaps (formats/base.py)."""
