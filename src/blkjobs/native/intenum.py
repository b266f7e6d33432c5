"""``IntEnum`` and ``IntFlag`` without ``enum``: the stdlib module imports
``functools`` and ``collections`` under it (with ``contextlib``'s share,
~20 M instructions, 5-7 ms of every command's start-up on our 2-core
machine; benchmarks/README.md, ``start19``), for three small classes on
every command's path (``formats.base.Kind``, ``graph.perm.Perm``,
``native.copy.RunResult``).

Their modules import this one as ``enum`` at run time and the real
``enum`` for the type checker only, so both must agree on what the code
uses: members are ``int`` singletons (``int``'s ``str`` and ``format``, as
3.11's IntEnum/IntFlag), with ``name`` and ``value`` and enum's ``repr``;
the class iterates over its members, has ``len``, ``__members__``,
``Cls[name]`` and ``member in Cls``; ``Cls(value)`` gives the member (an
IntEnum refuses other values with enum's ValueError; an IntFlag makes any
combination, with unnamed bits kept, as 3.11's default boundary does);
``|``, ``&``, ``^`` and ``~`` of flags are flags, ``in``/iteration/``len``
of a flag value are its bits; copies and pickles are the member itself.
(A flag class names single bits only: enum's names of values that mix a
named combination with unnamed bits are not reproduced.)
tests/test_intenum.py holds the two side by side over all of this.
"""
from __future__ import annotations

TYPE_CHECKING = False     # typing.TYPE_CHECKING without importing typing (start-up)
if TYPE_CHECKING:
    from typing import Any


def _is_member(key: str, value: object) -> bool:
    return not key.startswith("_") and isinstance(value, int) and not isinstance(value, bool)


class _EnumType(type):
    _members_: dict[str, Any]
    _by_value_: dict[object, Any]
    _flag_: bool
    _all_bits_: int

    def __new__(mcls, name, bases, ns):
        names = [(k, v) for k, v in ns.items() if _is_member(k, v)]
        cls = super().__new__(mcls, name, bases,
                              {k: v for k, v in ns.items() if not _is_member(k, v)})
        cls._members_ = {}
        cls._by_value_ = {}
        cls._flag_ = ns.get("_flag_", False) or any(getattr(b, "_flag_", False) for b in bases)
        for k, v in names:
            m = cls._by_value_.get(v)
            if m is None:           # a second name for a value is an alias, as enum's
                m = _new_member(cls, v, k)
                cls._by_value_[v] = m
            cls._members_[k] = m
            type.__setattr__(cls, k, m)
        cls._all_bits_ = 0
        for _, v in names:
            cls._all_bits_ |= v
        return cls

    def __call__(cls, value):
        try:
            m = cls._by_value_.get(value)     # (1.0 finds 1, as enum's lookup)
        except TypeError:                     # unhashable
            m = None
        if m is not None:
            return m
        if not cls._flag_ or not isinstance(value, int):
            raise ValueError(f"{value!r} is not a valid {cls.__qualname__}")
        value = int(value)
        if value < 0:           # as enum's Flag._missing_ (boundary KEEP) takes it
            all_bits = 2 ** cls._all_bits_.bit_length() - 1
            if value < ~all_bits:
                value = max(all_bits + 1, 2 ** value.bit_length()) + value
            if value < 0:
                value = all_bits + 1 + value
        m = cls._by_value_.get(value)
        if m is None:
            m = _new_member(cls, value, _flag_name(cls, value))
            cls._by_value_[value] = m   # (enum keeps its pseudo-members too)
        return m

    def _canonical(cls) -> list:
        """The members a class iterates over: an IntEnum's, without aliases; an
        IntFlag's single bits."""
        seen = []
        for m in cls._members_.values():
            if m not in seen and (not cls._flag_ or (m and m & (m - 1) == 0)):
                seen.append(m)
        return seen

    def __iter__(cls):
        return iter(cls._canonical())

    def __reversed__(cls):
        return reversed(cls._canonical())

    def __len__(cls):
        return len(cls._canonical())

    def __contains__(cls, member):
        if not isinstance(member, _Member):
            raise TypeError(f"unsupported operand type(s) for 'in': '{type(member).__qualname__}'"
                            " and 'EnumType'")
        return isinstance(member, cls) and member._name_ in cls._members_

    def __getitem__(cls, name):
        return cls._members_[name]

    @property
    def __members__(cls):
        return dict(cls._members_)

    def __setattr__(cls, key, value):
        if key in cls.__dict__.get("_members_", ()):
            raise AttributeError(f"cannot reassign member {key!r}")
        super().__setattr__(key, value)


def _new_member(cls: Any, value: int, name: str | None) -> Any:
    m = int.__new__(cls, value)
    m._name_ = name
    return m


def _flag_name(cls, value: int) -> str | None:
    if not value:
        return None
    parts = [m._name_ for m in cls._canonical() if value & m]
    rest = value & ~cls._all_bits_
    if rest and parts:          # (no name at all for unnamed bits alone, as enum's)
        parts.append(str(rest))
    return "|".join(parts) or None


class _Member(int, metaclass=_EnumType):
    _name_: str | None

    @property
    def name(self):
        return self._name_

    @property
    def value(self) -> int:
        return int(self)

    __str__ = int.__repr__
    __format__ = int.__format__

    def __repr__(self) -> str:
        cls = type(self).__name__
        if self._name_ is None:
            return f"<{cls}: {int(self)}>"
        return f"<{cls}.{self._name_}: {int(self)}>"

    def __reduce_ex__(self, proto):
        return type(self), (int(self),)

    def __copy__(self):
        return self

    def __deepcopy__(self, memo):
        return self


class IntEnum(_Member):
    pass


class IntFlag(_Member):
    _flag_ = True

    def __or__(self, other):
        if not isinstance(other, int):
            return NotImplemented
        return type(self)(int(self) | int(other))

    def __and__(self, other):
        if not isinstance(other, int):
            return NotImplemented
        return type(self)(int(self) & int(other))

    def __xor__(self, other):
        if not isinstance(other, int):
            return NotImplemented
        return type(self)(int(self) ^ int(other))

    __ror__ = __or__
    __rand__ = __and__
    __rxor__ = __xor__

    def __invert__(self):
        cls = type(self)
        return cls(cls._all_bits_ & ~int(self))

    def __contains__(self, other):
        if not isinstance(other, type(self)):
            raise TypeError(f"unsupported operand type(s) for 'in': '{type(other).__qualname__}'"
                            f" and '{type(self).__qualname__}'")
        return int(other) & int(self) == int(other)

    def __iter__(self):
        return iter([m for m in type(self)._canonical() if m & self])

    def __len__(self) -> int:
        return int(self).bit_count()

