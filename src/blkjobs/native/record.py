"""Value records without ``dataclasses`` (it imports ``inspect``, ~8 ms of
every raw -> raw convert's start-up): a subclass names its fields in
``__slots__`` and gets equality (same type, same fields), a hash and a repr
from them."""
from __future__ import annotations


class Record:
    __slots__: tuple[str, ...] = ()

    def _values(self) -> tuple:
        return tuple(getattr(self, k) for k in self.__slots__)

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and self._values() == other._values()

    def __hash__(self) -> int:
        return hash(self._values())

    def __repr__(self) -> str:
        return (f"{type(self).__name__}("
                + ", ".join(f"{k}={getattr(self, k)!r}" for k in self.__slots__) + ")")
