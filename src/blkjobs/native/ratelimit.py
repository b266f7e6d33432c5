"""Token bucket rate limiter (C, csrc/ratelimit.c) with an injectable clock."""
from __future__ import annotations

import time

from ..errors import UsageError
from ._lib import ensure, ffi, lib

TYPE_CHECKING = False     # typing.TYPE_CHECKING without importing typing (start-up)
if TYPE_CHECKING:
    from collections.abc import Callable    # (collections: not at start-up)


def _default_clock() -> int:
    return time.monotonic_ns()


class TokenBucket:
    """``rate`` bytes/s (0 = unlimited) with a burst of ``burst`` seconds.

    The default, no burst, starts empty and never saves anything up: with
    requests of at most :attr:`max_request` (rate/128), no 1 s window -- the
    first one and the one after an idle spell included -- carries more than
    ``rate * (1 + 1/128)`` bytes. A burst of B s lets a window carry
    ``rate * (1 + B)`` after idling.

    ``clock`` returns nanoseconds; pass a virtual clock in tests. The C copy
    engine reads the monotonic clock itself (CLOCK_MONOTONIC, the same clock
    as :func:`time.monotonic_ns`).
    """

    def __init__(self, rate: int, burst: float = 0.0,
                 clock: Callable[[], int] = _default_clock):
        if not isinstance(rate, int) or rate < 0:
            raise UsageError(f"invalid rate {rate!r}: must be a non-negative integer")
        if not burst >= 0:
            raise UsageError(f"invalid burst {burst!r}: must be >= 0")
        self._clock = clock
        p = ffi.new("struct bj_bucket **")
        ensure(lib.bj_bucket_new(p, rate, float(burst), clock()), "token bucket")
        self._b = ffi.gc(p[0], lib.bj_bucket_free)

    @property
    def rate(self) -> int:
        return int(lib.bj_bucket_rate(self._b))

    @rate.setter
    def rate(self, value: int) -> None:
        if not isinstance(value, int) or value < 0:
            raise UsageError(f"invalid rate {value!r}: must be a non-negative integer")
        ensure(lib.bj_bucket_set_rate(self._b, value, self._clock()), "token bucket")

    @property
    def max_request(self) -> int | None:
        """Largest request to issue at once, None when unlimited."""
        m = int(lib.bj_bucket_max_request(self._b))
        return None if m == 2**64 - 1 else m

    def take(self, nbytes: int) -> int:
        """Take ``nbytes``; return the ns to wait before doing that I/O."""
        return int(lib.bj_bucket_take(self._b, nbytes, self._clock()))

    def tokens(self) -> float:
        return float(lib.bj_bucket_tokens(self._b, self._clock()))

    def _cptr(self):  # for blkjobs.native.copy only
        return self._b
