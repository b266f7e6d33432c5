"""``info``, ``map`` and ``check`` with qemu-img 7.2's JSON field names (and
key order), for raw and qcow2 images and their backing chains.

Differences from qemu-img 7.2 we know of (documented, tests allow them):

* ``info``: ``actual-size`` is the file's
  allocated bytes at the moment of the call, as qemu-img's.
* ``map``: a run of subclusters that are unallocated in a qcow2 image with a
  host cluster reports its offset like qemu-img; nothing else knowingly
  differs.
"""
from __future__ import annotations

import errno
import os

from ..errors import CheckNotSupported, UsageError
from ..graph.lock import LockConflict, opening
from ..formats import is_nbd_uri, is_spec
from .files import fd_size, open_source
from ..units import sector_size
from .images import cli_graph, open_one, open_ro, probe


def info_raw(path: str) -> dict:
    # qemu-img info opens without I/O: a raw image gets no lock bytes
    fd = open_source(path)
    try:
        st = os.fstat(fd)
        return {"virtual-size": sector_size(fd_size(fd)), "filename": path, "format": "raw",
                "actual-size": st.st_blocks * 512, "dirty-flag": False}
    finally:
        os.close(fd)



def _unaligned_raw(node) -> bool:
    """A raw (or bare file) node on a host file whose size is not a whole
    number of sectors."""
    drv = node.driver
    return (node.format in ("raw", "file") and drv.host_file
            and _file_length(drv) % 512 != 0)


def _file_length(drv) -> int:
    """The host file's length: :attr:`Driver.file_length`, else the size."""
    n = drv.file_length
    return n if n is not None else drv.size


def _direct(path: str) -> bool:
    """``--image-opts`` with ``cache.direct=on``: QEMU opens the file with
    O_DIRECT and its block status rounds the data run at EOF up to a sector."""
    if not is_spec(path):
        return False
    from ..graph.blockspec import parse_opts
    try:
        return parse_opts(path).get("cache.direct") in ("on", "true", "yes")
    except Exception:       # not key=value (json:...): not a direct open we know of
        return False


def _eof_tail(path: str, size: int, end: int, last: dict | None) -> dict | None:
    """The sectors' part past the end of an unaligned raw file up to ``end``:
    QEMU's file driver reports it as a hole past EOF (zeroes), unless opened
    with O_DIRECT, where the data run at EOF covers the whole sector. Returns
    the entry to add (None: ``last`` was extended, or nothing to add)."""
    if end <= size:
        return None
    if (last is not None and last["data"] and last["start"] + last["length"] == size
            and _direct(path)):
        last["length"] += end - size
        return None
    return {"start": size, "length": end - size, "depth": 0, "present": True, "zero": True,
            "data": False, "compressed": False, "offset": size}


def info_nbd(path: str) -> dict:
    """An NBD export, as qemu-img info shows one (no disk size)."""
    from ..formats import open_image
    with opening(path), open_image(path, "raw") as drv:
        return {"virtual-size": drv.size, "filename": drv.filename, "format": "raw"}


def _node_info(node) -> dict:
    drv = node.driver
    if not drv.host_file and not drv.has_metadata:      # qcow2 over NBD: below
        bare = {"virtual-size": drv.size, "filename": node.filename, "format": node.format}
        if drv.protocol == "null-co":
            bare["actual-size"] = 0        # qemu-img's "disk size: 0 B"
        return bare
    st = os.fstat(drv.fd)     # qcow2 over NBD: its metadata mirror (formats.nbd_qcow2)
    d: dict = {}
    if drv.backing_filename and drv.backing_format:
        d["backing-filename-format"] = drv.backing_format
    if node.format == "qcow2" and drv.header.nb_snapshots:
        from ..formats.qcow2.snapshots import read_snapshots
        d["snapshots"] = [s.qapi() for s in read_snapshots(drv)]
    d["virtual-size"] = sector_size(drv.size) if _unaligned_raw(node) else drv.size
    d["filename"] = node.filename
    if drv.cluster_size:
        d["cluster-size"] = drv.cluster_size
    d["format"] = node.format
    if not drv.disk_size_unknown:
        d["actual-size"] = (drv.quorum_disk_size if drv.quorum_disk_size is not None
                            else st.st_blocks * 512)
    fs = drv.info()
    if fs:
        d["format-specific"] = fs
    if drv.backing_filename and not drv.no_dirname:
        from ..graph import resolve_backing
        d["full-backing-filename"] = resolve_backing(
            drv.map_filename if drv.map_filename is not None else node.filename,
            drv.backing_filename)
    if drv.backing_filename:
        d["backing-filename"] = drv.backing_filename
    if drv.encrypted:
        d["encrypted"] = True
    d["dirty-flag"] = drv.dirty_flag
    return d


def info(path: str, fmt: str | None = None, backing_chain: bool = False,
         force_share: bool = False) -> list[dict]:
    """One dict per image (the whole chain with ``backing_chain``), top first.
    Each image is locked as qemu-img info locks it (a qcow2 image lets nobody
    write it meanwhile, unless ``force_share``; a raw one is not locked);
    without ``backing_chain`` the backing files are not opened (nor locked),
    as with qemu-img."""
    if not backing_chain:
        fmt = probe(path, fmt, header_only=True)
        if is_nbd_uri(path) and fmt == "raw":
            return [info_nbd(path)]
        if fmt == "raw" and not is_spec(path):
            return [info_raw(path)]
        from ..graph import Perm
        # header only: info needs no key of an encrypted image, as qemu-img
        drv = open_one(path, fmt, header_only=True)
        node = cli_graph(force_share).add(drv, fmt=fmt)
        try:
            with opening(path):
                node.take("open", Perm.CONSISTENT_READ)
            return [_node_info(node)]
        finally:
            node.close()
    try:
        top = open_ro(path, fmt, force_share, header_only=True)
    except LockConflict as e:   # qemu-img opens each image of the chain by itself
        raise LockConflict(f"Could not open '{e.path}': {e.bare}", e.path) from None
    try:
        return [_node_info(n) for n in top.chain()]
    finally:
        top.close_chain()


def map_image(path: str, fmt: str | None = None, start: int = 0, length: int | None = None,
              work: int = 256 << 20, force_share: bool = False):
    """Yield ``qemu-img map --output json`` entries through the backing chain
    (``depth`` = layer that provides the run), asked per work range. Each
    entry also carries ``file`` (the filename of that layer; not in the JSON).
    The chain is locked as qemu-img map locks it (see :func:`.images.open_ro`)."""
    top = open_ro(path, fmt, force_share)
    try:
        # an unaligned raw file: its block status up to the end of the file,
        # the rest of its last sector as _eof_tail says (Raw.size is rounded)
        real = _file_length(top.driver) if _unaligned_raw(top) else top.size
        size = sector_size(real) if _unaligned_raw(top) else real
        end = size if length is None else min(size, start + length)
        if start < 0 or start > size:
            raise UsageError(f"invalid start offset {start}")
        nodes = top.chain()
        # the file holding each layer's data (qcow2: its external data file)
        names = [n.driver.data_path or (n.driver.map_filename if n.driver.map_filename is not None
                                        else n.filename)
                 for n in nodes]
        prealloc: dict[int, bool] = {}
        last = None
        pos = start
        while pos < end:
            n = min(work, end - pos)
            runs = top.block_status(pos, min(n, real - pos)) if pos < real else []
            runs = list(_preallocated_zeroes(runs, nodes, prealloc))
            tail = _eof_tail(path, max(pos, real), pos + n, runs[-1] if runs else last)
            for e in runs + ([tail] if tail else []):
                if last is not None and _joinable(last, e):
                    last["length"] += e["length"]
                    continue
                if last is not None:
                    yield last
                last = e
                last["file"] = names[min(e["depth"], len(names) - 1)]
            pos += n
        if last is not None:
            yield last
    finally:
        top.close_chain()


def metadata_preallocated(node) -> bool:
    """QEMU's guess that a qcow2 image was made with preallocation=metadata
    (``qcow2_detect_metadata_preallocation``): its file's clusters in use
    (refcount not 0) are at least max(allocated / cluster * 10 / 9,
    allocated / cluster + 2), allocated being the bytes the file system
    gave the file. Then its block status asks the file about the data runs:
    its holes read as zeroes."""
    drv = node.driver
    if node.format != "qcow2" or not drv.host_file or drv.encrypted:
        return False
    st = os.fstat(drv.fd)
    cs = drv.cluster_size
    real = st.st_blocks * 512 // cs
    threshold = max(real * 10 // 9, real + 2)
    rc = drv._rc()
    count = 0
    for c in range(-(-st.st_size // cs)):
        if count >= threshold:
            break
        count += rc.get(c) != 0
    return count >= threshold


def _preallocated_zeroes(runs, nodes, known: dict[int, bool]):
    """``runs`` with the data runs of a metadata-preallocated qcow2 layer
    split by its file's data and holes (past EOF too): the parts in holes
    are zero (and still data), as QEMU's block status says."""
    for e in runs:
        d = e["depth"]
        if not e["data"] or e["zero"] or "offset" not in e or d >= len(nodes):
            yield e
            continue
        if d not in known:
            known[d] = metadata_preallocated(nodes[d])
        if not known[d]:
            yield e
            continue
        fd = nodes[d].driver.data_fd      # the data file holds the runs
        eof = os.fstat(fd).st_size
        pos, end = e["offset"], e["offset"] + e["length"]
        while pos < end:
            zero, nxt = True, end
            if pos < eof:
                try:
                    nxt = os.lseek(fd, pos, os.SEEK_DATA)
                except OSError as err:  # ENXIO: a hole up to EOF, then past EOF
                    nxt = end
                    zero = err.errno == errno.ENXIO     # else: no SEEK_DATA, all data
                if zero and nxt <= pos:
                    zero, nxt = False, os.lseek(fd, pos, os.SEEK_HOLE)
            n = min(nxt, end) - pos
            yield dict(e, start=e["start"] + pos - e["offset"], length=n, offset=pos, zero=zero)
            pos += n


def _joinable(a, b):
    keys = ("depth", "present", "zero", "data", "compressed")
    if any(a[k] != b[k] for k in keys) or a["start"] + a["length"] != b["start"]:
        return False
    if ("offset" in a) != ("offset" in b):
        return False
    return "offset" not in a or a["offset"] + a["length"] == b["offset"]


# ---------------------------------------------------------------------------
# check
def check_image(path: str, fmt: str | None = None, repair: str | None = None,
                force_share: bool = False) -> dict:
    """Run the qcow2 consistency check (``repair`` None | 'leaks' | 'all');
    returns the ImageCheck dict with ``.messages``. raw raises
    :class:`CheckNotSupported` (exit_code 63: no checks for this format).

    Locks as qemu-img check: the image and its backing chain are opened (a
    repair opens the image read-write: it takes write and lets nobody else
    write; a check alone reads and lets nobody write, unless
    ``force_share``, which a repair refuses as qemu-img does)."""
    if repair is not None and force_share:
        raise UsageError(f"Could not open '{path}': force-share=on can only be used with "
                         "read-only images")
    fmt = probe(path, fmt)
    if fmt != "qcow2":
        raise CheckNotSupported("This image format does not support checks")
    from ..graph import open_chain
    from ..formats.qcow2.header import check_open_flag
    flag = check_open_flag()
    token = flag.set(True)        # the check reads the snapshot table itself
    try:
        with opening(path):
            top = open_chain(path, fmt, read_only=repair is None, graph=cli_graph(force_share))
    finally:
        flag.reset(token)
    try:
        res = top.driver.check(repair)
    finally:
        top.close_chain()
    res["filename"] = path
    return res


def check_exit_code(res: dict) -> int:
    if res.get("check-errors"):
        return 1
    if res.get("corruptions"):
        return 2
    if res.get("leaks"):
        return 3
    return 0
