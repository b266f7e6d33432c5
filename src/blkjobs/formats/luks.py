"""LUKS1 encryption as QEMU 7.2 writes and reads it: the ``luks`` format (a
raw-like disk behind a LUKS1 header) and the header inside an encrypted
qcow2 image (``encrypt.format=luks``); also the legacy qcow2 AES cipher.

The on-disk header (big endian, 592 bytes): magic ``LUKS\\xba\\xbe``,
version 1, cipher name (``aes``), cipher mode (``xts-plain64``,
``cbc-essiv:sha256``...), hash spec, payload offset (sectors), master key
length, master key digest (PBKDF2 of the master key, 20 bytes), its salt
and iterations, the UUID, then 8 key slots (active marker ``0x00AC71F3``,
PBKDF2 iterations, salt, key material offset in sectors, stripes). A key
slot's material is the master key split into 4000 stripes (the LUKS
anti-forensic split, diffused with the header's hash) and encrypted with a
key derived from the password (PBKDF2 with the slot's salt), sector by
sector with the same cipher as the data. QEMU writes slot 0 only; slot ``i``
starts at 4096 bytes + i times the material size rounded up to 4096 bytes,
and the payload follows the 8 slots.

Data is encrypted per 512-byte sector; the IV of a sector is its number
(``plain64``: 64 bits little endian; ``plain``: 32 bits; ``essiv``: that
number encrypted with the hash of the key). A ``luks`` image numbers
sectors from the payload's start (the guest offset / 512); a LUKS qcow2
image by the host offset of the sector in the qcow2 file; a legacy AES
qcow2 image by the guest offset.

Everything cryptographic (AES in XTS, CBC and ECB modes, PBKDF2) is the
``cryptography`` package's; the anti-forensic split is hashing and XOR.
"""
from __future__ import annotations

import hashlib
import os
import struct
import time
import uuid
from dataclasses import dataclass, field
from typing import Any
from collections.abc import Callable

from ..errors import ImageError, UsageError
from .base import CryptoOpenError, Driver, Fill, Kind, Mapping, open_file
from .sniff import LUKS_MAGIC
from ..native import dio

SECTOR = 512
MAGIC = LUKS_MAGIC
STRIPES = 4000
NUM_SLOTS = 8
SLOT_ACTIVE = 0x00AC71F3
SLOT_DISABLED = 0x0000DEAD
KEY_SLOT_OFFSET = 4096
MIN_ITERS = 1000
_HDR = struct.Struct(">6sH32s32s32sII20s32sI40s")       # 208 bytes
_SLOT = struct.Struct(">II32sII")                          # 48 bytes
HEADER_LEN = _HDR.size + NUM_SLOTS * _SLOT.size            # 592

HASHES = ("md5", "sha1", "sha224", "sha256", "sha384", "sha512", "ripemd160")
CIPHERS = {"aes-128": 16, "aes-192": 24, "aes-256": 32}


def _crypto() -> Any:
    try:
        from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
    except ImportError:
        raise UsageError("encrypted images need the 'cryptography' package "
                         "(pip install 'blkjobs[crypto]')") from None
    return Cipher, algorithms, modes


def pbkdf2(hash_alg: str, secret: bytes, salt: bytes, iters: int, n: int) -> bytes:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.pbkdf2 import PBKDF2HMAC
    algos: dict[str, hashes.HashAlgorithm] = {
        "md5": hashes.MD5(), "sha1": hashes.SHA1(), "sha224": hashes.SHA224(),
        "sha256": hashes.SHA256(), "sha384": hashes.SHA384(), "sha512": hashes.SHA512()}
    if hash_alg not in algos:
        raise UsageError(f"hash algorithm '{hash_alg}' is not supported by blkjobs")
    return PBKDF2HMAC(algorithm=algos[hash_alg], length=n, salt=salt,
                      iterations=iters).derive(secret)


def _xor(a: bytes, b: bytes) -> bytes:
    return (int.from_bytes(a, "big") ^ int.from_bytes(b, "big")).to_bytes(len(a), "big")


def _diffuse(hash_alg: str, block: bytes) -> bytes:
    dsz = hashlib.new(hash_alg).digest_size
    out = []
    for i in range(-(-len(block) // dsz)):
        piece = block[i * dsz:(i + 1) * dsz]
        out.append(hashlib.new(hash_alg, struct.pack(">I", i) + piece).digest()[:len(piece)])
    return b"".join(out)


def af_split(hash_alg: str, key: bytes, stripes: int) -> bytes:
    d = bytes(len(key))
    out = []
    for _ in range(stripes - 1):
        s = os.urandom(len(key))
        out.append(s)
        d = _diffuse(hash_alg, _xor(d, s))
    out.append(_xor(d, key))
    return b"".join(out)


def af_merge(hash_alg: str, material: bytes, n: int, stripes: int) -> bytes:
    d = bytes(n)
    for i in range(stripes - 1):
        d = _diffuse(hash_alg, _xor(d, material[i * n:(i + 1) * n]))
    return _xor(d, material[(stripes - 1) * n:stripes * n])


class SectorCipher:
    """A disk cipher: ``aes-N`` in mode ``xts``, ``cbc`` or ``ecb`` with IV
    generator ``plain64``, ``plain`` or ``essiv`` (``ivhash``), encrypting
    whole 512-byte sectors numbered from ``sector``."""

    def __init__(self, alg: str, mode: str, ivgen: str, key: bytes, ivhash: str | None = None):
        Cipher, algorithms, modes = _crypto()
        self._Cipher, self._modes, self._algorithms = Cipher, modes, algorithms
        self.mode, self.ivgen = mode, ivgen
        self._alg = algorithms.AES(key)
        self._essiv = None
        if ivgen == "essiv":
            ekey = hashlib.new(ivhash or "sha256", key).digest()
            self._essiv = Cipher(algorithms.AES(ekey), modes.ECB())

    def _iv(self, sector: int) -> bytes:
        if self.ivgen == "plain":
            return struct.pack("<I", sector & 0xFFFFFFFF) + bytes(12)
        iv = struct.pack("<Q", sector & 0xFFFFFFFFFFFFFFFF) + bytes(8)
        if self._essiv is not None:
            e = self._essiv.encryptor()
            return e.update(iv) + e.finalize()
        return iv

    def _run(self, sector: int, data: bytes | bytearray | memoryview, enc: bool) -> bytes:
        mv = memoryview(data).cast("B")
        if len(mv) % SECTOR:
            raise ImageError("encrypted I/O must be in whole 512-byte sectors")
        out = []
        for i in range(len(mv) // SECTOR):
            iv = self._iv(sector + i)
            m = (self._modes.XTS(iv) if self.mode == "xts" else self._modes.CBC(iv)
                 if self.mode == "cbc" else self._modes.ECB())
            c = self._Cipher(self._alg, m)
            op = c.encryptor() if enc else c.decryptor()
            out.append(op.update(mv[i * SECTOR:(i + 1) * SECTOR]) + op.finalize())
        return b"".join(out)

    def encrypt(self, sector: int, data: bytes | bytearray | memoryview) -> bytes:
        return self._run(sector, data, True)

    def decrypt(self, sector: int, data: bytes | bytearray | memoryview) -> bytes:
        return self._run(sector, data, False)


@dataclass
class Slot:
    active: int = SLOT_DISABLED
    iters: int = 0
    salt: bytes = bytes(32)
    key_offset: int = 0          # sectors from the header's start
    stripes: int = STRIPES


@dataclass
class LuksHeader:
    cipher_name: str = "aes"
    cipher_mode: str = "xts-plain64"
    hash_spec: str = "sha256"
    payload_offset: int = 0      # sectors
    key_bytes: int = 64
    mk_digest: bytes = bytes(20)
    mk_salt: bytes = bytes(32)
    mk_iters: int = 0
    uuid: str = ""
    slots: list[Slot] = field(default_factory=list)

    @classmethod
    def parse(cls, buf: bytes, what: str = "") -> LuksHeader:
        if len(buf) < HEADER_LEN or buf[:6] != MAGIC:
            raise ImageError(f"{what}Volume is not in LUKS format")
        (_, ver, cname, cmode, hspec, poff, kbytes, dig, salt, iters,
         uid) = _HDR.unpack_from(buf, 0)
        if ver != 1:
            raise ImageError(f"{what}LUKS version {ver} is not supported")
        def s(b: bytes) -> str:
            return b.split(b"\0", 1)[0].decode("ascii", "replace")
        h = cls(s(cname), s(cmode), s(hspec), poff, kbytes, dig, salt, iters, s(uid))
        for i in range(NUM_SLOTS):
            h.slots.append(Slot(*_SLOT.unpack_from(buf, _HDR.size + i * _SLOT.size)))
        return h

    def pack(self) -> bytes:
        out = _HDR.pack(MAGIC, 1, self.cipher_name.encode(), self.cipher_mode.encode(),
                        self.hash_spec.encode(), self.payload_offset, self.key_bytes,
                        self.mk_digest, self.mk_salt, self.mk_iters, self.uuid.encode())
        return out + b"".join(_SLOT.pack(s.active, s.iters, s.salt, s.key_offset, s.stripes)
                              for s in self.slots)

    # -- the cipher named by the header -------------------------------------
    def algs(self) -> tuple[str, str, str, str | None]:
        """(cipher-alg, cipher-mode, ivgen-alg, ivgen-hash-alg) as QEMU names them."""
        mode, _, iv = self.cipher_mode.partition("-")
        ivgen, _, ivhash = iv.partition(":")
        bits = self.key_bytes * 8 // (2 if mode == "xts" else 1)
        return f"{self.cipher_name}-{bits}", mode, ivgen or "plain", ivhash or None

    def cipher(self, key: bytes) -> SectorCipher:
        alg, mode, ivgen, ivhash = self.algs()
        if self.cipher_name != "aes" or mode not in ("xts", "cbc", "ecb") \
                or ivgen not in ("plain", "plain64", "essiv"):
            raise ImageError(f"cipher {self.cipher_name}-{self.cipher_mode} is not "
                             "supported by blkjobs (aes with xts, cbc or ecb; plain, "
                             "plain64 or essiv IVs)")
        return SectorCipher(alg, mode, ivgen, key, ivhash)

    def material_len(self) -> int:
        return -(-self.key_bytes * STRIPES // SECTOR) * SECTOR

    def unlock(self, password: bytes, read: Callable[[int, int], bytes]) -> bytes:
        """The master key, from the first active slot the password opens
        (``read(offset, n)``: bytes of the header's area). QEMU's text
        otherwise."""
        for sl in self.slots:
            if sl.active != SLOT_ACTIVE:
                continue
            if sl.stripes != STRIPES:
                raise ImageError(f"Keyslot stripes {sl.stripes} != {STRIPES}")
            skey = pbkdf2(self.hash_spec, password, sl.salt, sl.iters, self.key_bytes)
            raw = read(sl.key_offset * SECTOR, self.material_len())
            mat = self.cipher(skey).decrypt(0, raw)
            mk = af_merge(self.hash_spec, mat, self.key_bytes, STRIPES)
            if pbkdf2(self.hash_spec, mk, self.mk_salt, self.mk_iters, 20) == self.mk_digest:
                return mk
        raise CryptoOpenError("Invalid password, cannot unlock any keyslot")

    def info(self, fmt: bool = False) -> dict[str, Any]:
        """QEMU's format-specific fields, in the order qemu-img prints them
        (``fmt``: with ``"format": "luks"``, inside a qcow2 image)."""
        alg, mode, ivgen, ivhash = self.algs()
        d: dict[str, Any] = {"ivgen-alg": ivgen, "hash-alg": self.hash_spec,
                             "cipher-alg": alg, "uuid": self.uuid}
        if fmt:
            d["format"] = "luks"
        if ivhash:
            d["ivgen-hash-alg"] = ivhash
        d["cipher-mode"] = mode
        slots: list[dict[str, Any]] = []
        for s in self.slots:
            if s.active == SLOT_ACTIVE:
                slots.append({"active": True, "iters": s.iters,
                              "key-offset": s.key_offset * SECTOR, "stripes": s.stripes})
            else:
                slots.append({"active": False, "key-offset": s.key_offset * SECTOR})
        d["slots"] = slots
        d["payload-offset"] = self.payload_offset * SECTOR
        d["master-key-iters"] = self.mk_iters
        return d


def _iters_per_second(hash_alg: str, key_bytes: int) -> float:
    """PBKDF2 iterations per second on this machine (QEMU measures too)."""
    n = 1 << 12
    while True:
        t0 = time.process_time()
        pbkdf2(hash_alg, b"x" * 32, b"s" * 32, n, key_bytes)
        dt = time.process_time() - t0
        if dt >= 0.05 or n >= 1 << 22:
            return n / max(dt, 1e-6)
        n *= 4


@dataclass
class CreateOpts:
    """qemu-img's ``luks`` create options (``encrypt.*`` for qcow2)."""

    key_secret: str | None = None
    cipher_alg: str = "aes-256"
    cipher_mode: str = "xts"
    ivgen_alg: str = "plain64"
    ivgen_hash_alg: str | None = None
    hash_alg: str = "sha256"
    iter_time: int = 2000

    def check(self) -> None:
        if self.cipher_alg not in CIPHERS:
            raise UsageError(f"cipher algorithm '{self.cipher_alg}' is not supported by "
                             f"blkjobs ({', '.join(CIPHERS)})")
        if self.cipher_mode not in ("xts", "cbc", "ecb"):
            raise UsageError(f"Parameter 'cipher-mode' does not accept value '{self.cipher_mode}'")
        if self.ivgen_alg not in ("plain", "plain64", "essiv"):
            raise UsageError(f"Parameter 'ivgen-alg' does not accept value '{self.ivgen_alg}'")
        for h in (self.hash_alg, self.ivgen_hash_alg or "sha256"):
            if h not in HASHES[:6]:
                raise UsageError(f"Parameter 'hash-alg' does not accept value '{h}'")


def _key_bytes(o: CreateOpts) -> int:
    return CIPHERS[o.cipher_alg] * (2 if o.cipher_mode == "xts" else 1)


def _slot_step(key_bytes: int) -> int:
    """Sectors from one key slot's material to the next (4 KiB aligned)."""
    material = -(-key_bytes * STRIPES // SECTOR) * SECTOR
    return -(-material // KEY_SLOT_OFFSET) * KEY_SLOT_OFFSET // SECTOR


def payload_bytes(o: CreateOpts, prefix: str = "") -> int:
    """The LUKS area (header and the 8 key slots) a new image of these
    options starts with: where its payload begins, in bytes. The options
    are checked, and the secret looked up, as creating the image does
    (QEMU's measure creates a throwaway header; the key derivation changes
    nothing of the size, so it is left out here)."""
    from .secrets import secret
    if o.key_secret is None:
        raise key_required(prefix + "key-secret")
    o.check()
    secret(o.key_secret)
    return KEY_SLOT_OFFSET + _slot_step(_key_bytes(o)) * NUM_SLOTS * SECTOR


def build_header(password: bytes, o: CreateOpts) -> tuple[bytes, bytes, LuksHeader]:
    """A new LUKS1 area as QEMU lays it out: (the bytes of header and slot 0's
    material up to the payload offset, the master key, the header)."""
    o.check()
    kb = _key_bytes(o)
    ivname = o.ivgen_alg + (f":{o.ivgen_hash_alg or 'sha256'}" if o.ivgen_alg == "essiv" else "")
    h = LuksHeader("aes", f"{o.cipher_mode}-{ivname}", o.hash_alg, key_bytes=kb,
                   uuid=str(uuid.uuid4()))
    mk = os.urandom(kb)
    if o.cipher_mode == "xts":
        while mk[:kb // 2] == mk[kb // 2:]:
            mk = os.urandom(kb)
    rate = _iters_per_second(o.hash_alg, kb)
    step = _slot_step(kb)
    for i in range(NUM_SLOTS):
        h.slots.append(Slot(key_offset=KEY_SLOT_OFFSET // SECTOR + step * i))
    h.payload_offset = KEY_SLOT_OFFSET // SECTOR + step * NUM_SLOTS
    h.mk_salt = os.urandom(32)
    h.mk_iters = max(int(rate * o.iter_time / 1000) // 8, MIN_ITERS)
    h.mk_digest = pbkdf2(o.hash_alg, mk, h.mk_salt, h.mk_iters, 20)
    s0 = h.slots[0]
    s0.active, s0.salt = SLOT_ACTIVE, os.urandom(32)
    s0.iters = max(int(rate * o.iter_time / 1000), MIN_ITERS)
    skey = pbkdf2(o.hash_alg, password, s0.salt, s0.iters, kb)
    mat = af_split(o.hash_alg, mk, STRIPES).ljust(h.material_len(), b"\0")
    area = bytearray(h.payload_offset * SECTOR)
    area[:HEADER_LEN] = h.pack()
    off = s0.key_offset * SECTOR
    area[off:off + len(mat)] = h.cipher(skey).encrypt(0, mat)
    return bytes(area), mk, h


def parse_create_opts(opts: dict[str, Any], prefix: str = "") -> CreateOpts:
    """``key-secret``, ``cipher-alg``... (``prefix`` ``encrypt.`` for qcow2)
    out of ``opts`` (removed from it) into :class:`CreateOpts`."""
    o = CreateOpts()
    for name in list(opts):
        if not name.startswith(prefix):
            continue
        key = name[len(prefix):]
        attr = key.replace("-", "_")
        if key in ("format",) or not hasattr(o, attr):
            continue
        val = opts.pop(name)
        if attr == "iter_time":
            try:        # QEMU's number options: strtoull, base 0 (0x10, 010)
                val = int(val, 8 if val[:1] == "0" and val[1:2].isdigit() else 0) \
                    if isinstance(val, str) else int(val)
            except ValueError:
                raise UsageError(f"Parameter '{key}' expects a number") from None
        setattr(o, attr, val)
    return o


def key_required(what: str = "key-secret") -> CryptoOpenError:
    return CryptoOpenError(f"Parameter '{what}' is required for cipher")


class Luks(Driver):
    """A ``luks`` image: the LUKS1 header, then the payload (the guest disk,
    encrypted). Opened ``header_only`` only its header can be read
    (``info``): the key is then neither looked up nor tried, as QEMU's
    no-I/O open does not."""

    format_name = "luks"
    encrypted = True

    def __init__(self, path: str, read_only: bool = True, key_secret: str | None = None,
                 header_only: bool = False):
        self.filename = path
        self.read_only = read_only
        self._fd = open_file(path, os.O_RDONLY if read_only else os.O_RDWR)
        self._closed = False
        try:
            self.header = LuksHeader.parse(dio.pread(self._fd, HEADER_LEN, 0))
            self.payload = self.header.payload_offset * SECTOR
            self._cipher: SectorCipher | None = None
            self.master_key: bytes | None = None     # key slot amends need it
            if key_secret is not None and not header_only:
                from .secrets import secret
                pw = secret(key_secret)
                mk = self.header.unlock(pw, lambda o, n: dio.pread(self._fd, n, o))
                self._cipher = self.header.cipher(mk)
                self.master_key = mk
            elif not header_only:
                raise key_required()
        except BaseException:
            os.close(self._fd)
            self._closed = True
            raise

    @property
    def fd(self) -> int:
        if self._closed:
            raise ImageError(f"'{self.filename}': image is closed")
        return self._fd

    @property
    def size(self) -> int:
        return max(0, os.fstat(self.fd).st_size - self.payload)

    def _c(self) -> SectorCipher:
        if self._cipher is None:
            raise key_required()
        return self._cipher

    def map_host(self, offset: int, length: int) -> list[Mapping]:
        # every byte is data; its host bytes are ciphertext: no host offset
        # (qemu-img map prints none either), the copy paths read through us
        end = min(offset + length, self.size)
        return [Mapping(offset, end - offset, Kind.DATA, None)] if end > offset else []

    def readinto(self, offset: int, buf: bytearray | memoryview) -> None:
        mv = memoryview(buf).cast("B")
        n = len(mv)
        if offset < 0 or offset + n > self.size:
            raise UsageError(f"read beyond the end of '{self.filename}'")
        pos = 0
        while pos < n:           # 1 MiB of ciphertext at a time: bounded memory
            a = (offset + pos) // SECTOR * SECTOR
            b = min(-(-(offset + n) // SECTOR) * SECTOR, a + (1 << 20))
            raw = dio.pread(self.fd, b - a, self.payload + a)
            if len(raw) != b - a:
                raise ImageError(f"'{self.filename}': short read")
            plain = self._c().decrypt(a // SECTOR, raw)
            k = min(b, offset + n) - (offset + pos)
            mv[pos:pos + k] = plain[offset + pos - a:offset + pos - a + k]
            pos += k

    def read(self, offset: int, length: int) -> bytes:
        b = bytearray(length)
        self.readinto(offset, b)
        return bytes(b)

    def write(self, offset: int, data: bytes | bytearray | memoryview,
              fill: Fill | None = None) -> None:
        if self.read_only:
            raise ImageError(f"'{self.filename}': image is opened read-only")
        mv = memoryview(data).cast("B")
        if offset < 0 or offset + len(mv) > self.size:
            raise UsageError(f"write beyond the end of '{self.filename}'")
        pos = 0
        while pos < len(mv):
            a = (offset + pos) // SECTOR * SECTOR
            b = min(-(-(offset + len(mv)) // SECTOR) * SECTOR, a + (1 << 20))
            k = min(b, offset + len(mv)) - (offset + pos)
            lo = offset + pos - a
            if lo or k != b - a:            # partial sectors: read, modify
                plain = bytearray(self.read(a, b - a))
            else:
                plain = bytearray(b - a)
            plain[lo:lo + k] = mv[pos:pos + k]
            dio.pwrite(self.fd, self._c().encrypt(a // SECTOR, plain), self.payload + a)
            pos += k

    def write_zeroes(self, offset: int, length: int, may_unmap: bool = True,
                     fill: Fill | None = None) -> None:
        end = min(offset + length, self.size)
        while offset < end:       # zeroes are encrypted like any data
            n = min(end - offset, 1 << 20)
            self.write(offset, bytes(n))
            offset += n

    def discard(self, offset: int, length: int) -> None:
        """Nothing: a discarded range of an encrypted disk keeps its data."""

    def flush(self) -> None:
        if not self.read_only and not self._closed:
            os.fsync(self._fd)

    def close(self) -> None:
        if self._closed:
            return
        try:
            self.flush()
        finally:
            self._closed = True
            os.close(self._fd)

    def info(self) -> dict[str, Any]:
        return {"type": "luks", "data": self.header.info()}

    def luks_area(self) -> tuple[LuksHeader, bytes, Callable[[int, int], bytes],
                                 Callable[[int, bytes], None]]:
        """(header, master key, read, write) of the LUKS area (offsets from
        the header's start), to amend its key slots (:mod:`.luks_slots`)."""
        if self.master_key is None:
            raise key_required()
        return (self.header, self.master_key, lambda o, n: dio.pread(self.fd, n, o),
                self._write_area)

    def _write_area(self, offset: int, data: bytes) -> None:
        if self.read_only:
            raise ImageError(f"'{self.filename}': image is opened read-only")
        dio.pwrite(self.fd, data, offset)
        os.fsync(self.fd)


def create(path: str, size: int, preallocation: str = "off", **opts: Any) -> None:
    """A new ``luks`` image (``key_secret`` names the password's secret)."""
    o = parse_create_opts({k.replace("_", "-"): v for k, v in opts.items()})
    left = [k for k in opts if not hasattr(o, k)]
    if left:
        raise UsageError(f"Invalid parameter '{left[0].replace('_', '-')}' for format luks")
    if o.key_secret is None:
        raise key_required()
    if preallocation not in ("off", "falloc", "full"):
        raise UsageError(f"Unsupported preallocation mode: {preallocation}")
    from .secrets import secret
    area, _, h = build_header(secret(o.key_secret), o)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        dio.pwrite(fd, area, 0)
        os.ftruncate(fd, len(area) + size)
        if preallocation != "off" and size:
            os.posix_fallocate(fd, len(area), size)
        os.fsync(fd)
    finally:
        os.close(fd)
