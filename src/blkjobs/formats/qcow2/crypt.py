"""Encrypted qcow2 images: ``crypt_method`` 2 (LUKS) and 1 (legacy AES).

LUKS: the header extension ``0x0537be77`` holds the offset and length of a
LUKS1 area (header and key slots, :mod:`..luks`) stored in clusters of the
qcow2 file; its payload offset is not used. Data clusters hold ciphertext,
each 512-byte sector encrypted with its *host* offset / 512 as the IV's
sector number. Legacy AES (``encryption=on``): AES-128-CBC, the key being
the password's first 16 bytes (zero padded), the IV the *guest* offset / 512
(plain64). Metadata (header, tables, refcounts) is never encrypted, so
``info`` and ``check`` need no key.

:class:`CryptQcow2` is a :class:`.driver.Qcow2` whose guest data passes
through the cipher: ``map_host`` reports data without host offsets (the copy
engines then read and write through the driver, never the file), writes go
whole cluster by whole cluster (read, decrypt, modify, encrypt), and
``allocate``/``host_run``/compression are not offered.
"""
from __future__ import annotations

import os
import struct
from typing import Any

from ...errors import ImageError, UsageError
from ..base import Fill, Kind, Mapping
from ..luks import CreateOpts, LuksHeader, SectorCipher, build_header, key_required
from .driver import Qcow2
from .header import EXT_CRYPTO
from .mapping import Reads
from ...native import dio

CRYPT_AES, CRYPT_LUKS = 1, 2
_CHUNK = 1 << 20


class CryptQcow2(Qcow2):
    """An encrypted qcow2 image (see the module)."""

    encrypted = True
    can_allocate = False
    can_compress = False

    def __init__(self, path: str, read_only: bool = True, key_secret: str | None = None,
                 header_only: bool = False) -> None:
        super().__init__(path, read_only)
        try:
            self._setup(key_secret, header_only)
        except BaseException:
            self._closed = True
            os.close(self._fd)
            raise

    def _setup(self, key_secret: str | None, header_only: bool) -> None:
        h = self.header
        self.method = h.crypt_method
        self.luks: LuksHeader | None = None
        self.cipher: SectorCipher | None = None
        self.master_key: bytes | None = None     # key slot amends need it
        if self.method == CRYPT_LUKS:
            ext = h.ext(EXT_CRYPTO)
            if ext is None or len(ext) < 16:
                raise ImageError(f"'{self.filename}': No encryption layer header found")
            self.crypt_off, self.crypt_len = struct.unpack(">QQ", ext[:16])
            self.luks = LuksHeader.parse(dio.pread(self.fd, 4096, self.crypt_off),
                                         f"'{self.filename}': ")
        elif self.method != CRYPT_AES:
            raise ImageError(f"'{self.filename}': Unsupported encryption method "
                             f"{self.method}")
        if header_only:         # info: QEMU's no-I/O open looks no key up
            return
        if key_secret is None:
            raise key_required("encrypt.key-secret")
        from ..secrets import secret
        pw = secret(key_secret)
        if self.luks is not None:
            off = self.crypt_off
            mk = self.luks.unlock(pw, lambda o, n: dio.pread(self.fd, n, off + o))
            self.cipher = self.luks.cipher(mk)
            self.master_key = mk
        else:
            self.cipher = SectorCipher("aes-128", "cbc", "plain64", pw[:16].ljust(16, b"\0"))

    def _c(self) -> SectorCipher:
        if self.cipher is None:
            raise key_required("encrypt.key-secret")
        return self.cipher

    def _sector(self, guest: int, host: int) -> int:
        return (host if self.method == CRYPT_LUKS else guest) // 512

    # -- reads -----------------------------------------------------------------
    def host_run(self, offset: int, length: int, for_write: bool = False) -> int | None:
        return None

    def map_host(self, offset: int, length: int) -> list[Mapping]:
        return [Mapping(m.start, m.length, m.kind, None) if m.kind == Kind.DATA else m
                for m in Reads.map_host(self, offset, length)]

    def readinto(self, offset: int, buf: Any) -> None:
        mv = memoryview(buf).cast("B")
        n = len(mv)
        if offset + n > self.size:
            raise UsageError(f"read beyond the end of the image ({offset}+{n} > {self.size})")
        for m in Reads.map_host(self, offset, n):
            a, b = m.start - offset, m.start - offset + m.length
            if m.kind == Kind.DATA:
                assert m.host_offset is not None
                self._read_data(mv[a:b], m.start, m.host_offset)
            elif m.kind == Kind.COMPRESSED:
                raise ImageError(f"'{self.filename}': compressed clusters in an "
                                 "encrypted image are not supported")
            else:
                mv[a:b] = bytes(b - a)

    def _read_data(self, mv: memoryview, guest: int, host: int) -> None:
        """Decrypt the run at ``host`` (guest ``guest``) into ``mv``, in
        sector-aligned pieces of at most 1 MiB."""
        pos, n = 0, len(mv)
        while pos < n:
            a = (guest + pos) // 512 * 512
            b = min(-(-(guest + n) // 512) * 512, a + _CHUNK)
            ha = host + (a - guest)
            raw = dio.pread(self.fd, b - a, ha).ljust(b - a, b"\0")
            plain = self._c().decrypt(self._sector(a, ha), raw)
            k = min(b, guest + n) - (guest + pos)
            mv[pos:pos + k] = plain[guest + pos - a:guest + pos - a + k]
            pos += k

    # -- writes ----------------------------------------------------------------
    def write(self, offset: int, data: Any, fill: Fill | None = None) -> None:
        mv = memoryview(data).cast("B")
        self._check_writable(offset, len(mv))
        cs = self.cluster_size
        pos, end = offset, offset + len(mv)
        while pos < end:
            a = pos // cs * cs
            b = min(max(-(-min(end, a + _CHUNK) // cs) * cs, a + cs), self.size)
            self._write_clusters(a, b, mv[pos - offset:min(end, b) - offset], pos, fill)
            pos = min(end, b)

    def _write_clusters(self, a: int, b: int, data: memoryview, at: int,
                        fill: Fill | None) -> None:
        """Whole clusters [a, b): their guest view with ``data`` put at
        ``at``, encrypted into the host clusters allocate() hands back."""
        plain = bytearray(b - a)
        view = memoryview(plain)
        if at > a or at + len(data) < b:
            for m in Reads.map_host(self, a, b - a):
                s, e = m.start - a, m.start - a + m.length
                if m.kind == Kind.DATA:
                    assert m.host_offset is not None
                    self._read_data(view[s:e], m.start, m.host_offset)
                elif m.kind == Kind.UNALLOCATED and fill is not None:
                    fill(m.start, view[s:e])
                elif m.kind == Kind.COMPRESSED:
                    raise ImageError(f"'{self.filename}': compressed clusters in an "
                                     "encrypted image are not supported")
        view[at - a:at - a + len(data)] = data
        for m in Qcow2.allocate(self, a, b - a):
            assert m.host_offset is not None
            s = m.start - a
            ln = -(-m.length // 512) * 512
            chunk = bytes(view[s:s + m.length]).ljust(ln, b"\0")
            dio.pwrite(self.fd, self._c().encrypt(self._sector(m.start, m.host_offset), chunk),
                      m.host_offset)

    def allocate(self, offset: int, length: int, undo: list | None = None) -> list[Mapping]:
        raise self._unsupported("allocation for in-place writes (it is encrypted)")

    def write_compressed(self, offset: int, cluster_data: Any,
                         compressed: bytes | None = None) -> None:
        raise self._unsupported("compression (it is encrypted)")

    def luks_area(self) -> tuple[LuksHeader, bytes, Any, Any]:
        """(header, master key, read, write) of the LUKS area (offsets from
        its start), to amend its key slots (:mod:`..luks_slots`); QEMU's
        texts for an image without one."""
        if self.luks is None:
            raise UsageError("Only LUKS encryption options can be amended")
        if self.master_key is None:
            raise key_required("encrypt.key-secret")
        off = self.crypt_off

        def write(o: int, data: bytes) -> None:
            self._check_writable(0, 0)
            dio.pwrite(self.fd, data, off + o)
            os.fsync(self.fd)
        return self.luks, self.master_key, lambda o, n: dio.pread(self.fd, n, off + o), write

    def info(self) -> dict:
        d = super().info()
        enc: dict[str, Any] = (self.luks.info(fmt=True) if self.luks is not None
                               else {"format": "aes"})
        data = d["data"]
        rest = {k: data.pop(k) for k in ("corrupt", "extended-l2") if k in data}
        data["encrypt"] = enc
        data.update(rest)
        return d


def add_luks_area(path: str, password: bytes, o: CreateOpts) -> None:
    """Put a new LUKS area into the fresh qcow2 image at ``path``: clusters
    at the end of the file (refcount 1), the crypto header extension first
    among the extensions, crypt_method 2 (what QEMU's create does)."""
    area, _, _ = build_header(password, o)
    with Qcow2(path, read_only=False) as img:
        cs = img.cluster_size
        rc = img._rc()
        n = -(-len(area) // cs)
        while True:     # refcount blocks for the whole run first: it stays in one piece
            c = rc.end
            for t in range(c // rc.rbe, (c + n - 1) // rc.rbe + 1):
                rc._ensure_block(t * rc.rbe)
            if rc.end == c:
                break
        runs = rc.alloc(n)
        if len(runs) != 1:
            raise ImageError(f"'{path}': the LUKS header needs {n} contiguous clusters; "
                             "use a larger cluster size")
        host = runs[0][0] * cs
        dio.pwrite(img.fd, area.ljust(n * cs, b"\0"), host)
        img.flush()
        h = img.header
        h.crypt_method = CRYPT_LUKS
        h.extensions = [(EXT_CRYPTO, struct.pack(">QQ", host, len(area)))] + \
            [(t, d) for t, d in h.extensions if t != EXT_CRYPTO]
        img._write_header()


def set_aes(path: str) -> None:
    """Mark the fresh qcow2 image at ``path`` as legacy-AES encrypted."""
    with Qcow2(path, read_only=False) as img:
        img.header.crypt_method = CRYPT_AES
        img._write_header()
