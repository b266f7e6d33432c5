"""LUKS1 key slot management: what ``qemu-img amend`` does to a ``luks``
image or the LUKS area of an encrypted qcow2 image with
``state=active|inactive``, ``new-secret``, ``old-secret``, ``keyslot`` and
``iter-time`` (``encrypt.`` before each for qcow2), with QEMU 7.2's checks
and texts.

Activating a slot (``state=active``): ``new-secret`` names the password to
add; the slot is ``keyslot`` or else the first inactive one. The master key
is the one the image was opened with. The slot gets a new salt, PBKDF2
iterations for ``iter-time`` milliseconds on this machine (at least 1000),
and its key material (the master key split into 4000 anti-forensic stripes,
encrypted with the key derived from the password) is written before the
header that makes the slot active.

Erasing (``state=inactive``): the slot ``keyslot`` (checked against
``old-secret`` when both are given) or every slot ``old-secret`` opens. Its
key material is overwritten with random bytes, then the header marks it
disabled (salt and iterations zeroed). Erasing every active slot would make
the data unreadable forever: refused unless ``--force``.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..errors import UsageError
from .luks import (MIN_ITERS, NUM_SLOTS, SECTOR, SLOT_ACTIVE, SLOT_DISABLED, STRIPES,
                   LuksHeader, _iters_per_second, af_merge, af_split, pbkdf2)

#: the amend options of a LUKS layer (without the ``encrypt.`` prefix)
AMEND_OPTIONS = ("iter-time", "keyslot", "new-secret", "old-secret", "state")
DEFAULT_ITER_TIME = 2000

Reader = Callable[[int, int], bytes]
Writer = Callable[[int, bytes], None]


@dataclass
class AmendOpts:
    state: str
    new_secret: str | None = None
    old_secret: str | None = None
    keyslot: int | None = None
    iter_time: int | None = None


def parse_amend(opts: dict[str, str], prefix: str = "") -> AmendOpts:
    """The key slot options out of ``opts`` (names with ``prefix``), as
    QEMU parses them (its texts)."""
    def num(name: str) -> int | None:
        if prefix + name not in opts:
            return None
        try:
            return int(opts[prefix + name], 0)
        except ValueError:
            raise UsageError(f"Parameter '{prefix}{name}' expects a number") from None
    keyslot, iter_time = num("keyslot"), num("iter-time")
    state = opts.get(prefix + "state")
    if state is None:
        raise UsageError("Parameter 'state' is missing")
    if state not in ("active", "inactive"):
        raise UsageError(f"Parameter 'state' does not accept value '{state}'")
    return AmendOpts(state, opts.get(prefix + "new-secret"), opts.get(prefix + "old-secret"),
                     keyslot, iter_time)


class KeySlots:
    """The LUKS area of an open image: its header, the master key it was
    unlocked with, and ``read(offset, n)``/``write(offset, data)`` of the
    area (offsets from the header's start)."""

    def __init__(self, header: LuksHeader, master_key: bytes, read: Reader,
                 write: Writer) -> None:
        self.h, self.mk, self.read, self.write = header, master_key, read, write

    @classmethod
    def of(cls, drv: Any) -> KeySlots:
        """The key slots of an open encrypted image (``luks``, qcow2 with
        LUKS): its ``luks_area()``."""
        return cls(*drv.luks_area())

    def amend(self, o: AmendOpts, force: bool = False) -> None:
        if o.state == "active":
            self._add(o, force)
        else:
            self._erase(o, force)

    # -- the slots ---------------------------------------------------------------------
    def _active(self, i: int) -> bool:
        return self.h.slots[i].active == SLOT_ACTIVE

    def _opens(self, i: int, password: bytes) -> bool:
        """``password`` opens slot ``i`` (an active one)."""
        h, sl = self.h, self.h.slots[i]
        if sl.active != SLOT_ACTIVE:
            return False
        skey = pbkdf2(h.hash_spec, password, sl.salt, sl.iters, h.key_bytes)
        mat = h.cipher(skey).decrypt(0, self.read(sl.key_offset * SECTOR, h.material_len()))
        mk = af_merge(h.hash_spec, mat, h.key_bytes, STRIPES)
        return pbkdf2(h.hash_spec, mk, h.mk_salt, h.mk_iters, 20) == h.mk_digest

    def _store(self, i: int, password: bytes, iter_time: int) -> None:
        h, sl = self.h, self.h.slots[i]
        rate = int(_iters_per_second(h.hash_spec, h.key_bytes))
        if iter_time < 0:       # QEMU scales an unsigned number: it overflows
            raise UsageError(f"PBKDF iterations {rate} too large to scale: Numerical "
                             f"result out of range\nFailed to write to keyslot {i}")
        iters = rate * iter_time // 1000
        if iters > 0xFFFFFFFF:
            raise UsageError(f"PBKDF iterations {iters} larger than {0xFFFFFFFF}\n"
                             f"Failed to write to keyslot {i}")
        sl.iters = max(iters, MIN_ITERS)
        sl.salt = os.urandom(32)
        sl.stripes = STRIPES
        skey = pbkdf2(h.hash_spec, password, sl.salt, sl.iters, h.key_bytes)
        mat = af_split(h.hash_spec, self.mk, STRIPES).ljust(h.material_len(), b"\0")
        self.write(sl.key_offset * SECTOR, h.cipher(skey).encrypt(0, mat))
        sl.active = SLOT_ACTIVE
        self.write(0, h.pack())

    def _wipe(self, i: int) -> None:
        h, sl = self.h, self.h.slots[i]
        self.write(sl.key_offset * SECTOR, os.urandom(h.material_len()))
        sl.active, sl.iters, sl.salt = SLOT_DISABLED, 0, bytes(32)
        self.write(0, h.pack())

    # -- QEMU's two operations ---------------------------------------------------------
    def _add(self, o: AmendOpts, force: bool) -> None:
        from .secrets import secret
        if o.new_secret is None:
            raise UsageError("'new-secret' is required to activate a keyslot")
        if o.old_secret is not None:
            raise UsageError("'old-secret' must not be given when activating keyslots")
        if o.keyslot is not None:
            slot = o.keyslot
            if not 0 <= slot < NUM_SLOTS:
                raise UsageError(f"Invalid keyslot {slot & 0xFFFFFFFF} specified, must be "
                                 f"between 0 and {NUM_SLOTS - 1}")
        else:
            free = [i for i in range(NUM_SLOTS) if not self._active(i)]
            if not free:
                raise UsageError("Can't add a keyslot - all keyslots are in use")
            slot = free[0]
        if not force and self._active(slot):
            raise UsageError(f"Refusing to overwrite active keyslot {slot} - please "
                             "erase it first")
        password = secret(o.new_secret)
        self._store(slot, password, DEFAULT_ITER_TIME if o.iter_time is None else o.iter_time)

    def _erase(self, o: AmendOpts, force: bool) -> None:
        from .secrets import secret
        if o.new_secret is not None:
            raise UsageError("'new-secret' must not be given when erasing keyslots")
        if o.iter_time is not None:
            raise UsageError("'iter-time' must not be given when erasing keyslots")
        old = secret(o.old_secret) if o.old_secret is not None else None
        n_active = sum(self._active(i) for i in range(NUM_SLOTS))
        if o.keyslot is not None:
            slot = o.keyslot
            if not 0 <= slot < NUM_SLOTS:
                raise UsageError(f"Invalid keyslot {slot} specified, must be between 0 "
                                 f"and {NUM_SLOTS - 1}")
            if old is not None and not self._opens(slot, old):
                raise UsageError(f"Given keyslot {slot} doesn't contain the given old "
                                 "password for erase operation")
            if not force and not self._active(slot):
                raise UsageError(f"Given keyslot {slot} is already erased (inactive) ")
            if not force and n_active == 1:
                raise UsageError(f"Attempt to erase the only active keyslot {slot} which "
                                 "will erase all the data in the image irreversibly - "
                                 "refusing operation")
            self._wipe(slot)
            return
        if old is None:
            raise UsageError("To erase keyslot(s), either explicit keyslot index or the "
                             "password currently contained in them must be given")
        match = [i for i in range(NUM_SLOTS) if self._opens(i, old)]
        if not match:
            raise UsageError("No keyslots match given (old) password for erase operation")
        if not force and len(match) == n_active:
            raise UsageError("All the active keyslots match the (old) password that was "
                             "given and erasing them will erase all the data in the image "
                             "irreversibly - refusing operation")
        for i in match:
            self._wipe(i)
