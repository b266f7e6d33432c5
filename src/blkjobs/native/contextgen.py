"""``contextlib.contextmanager`` without ``contextlib``: the stdlib module
imports ``functools`` and ``collections`` under it (~13 M instructions,
4-5 ms of every command's start-up on our 2-core machine; benchmarks/
README.md, ``start19``) for the two ``opening`` context managers on every
command's path (``graph.lock``, ``formats.cache``).

Their modules import this one as ``contextlib`` at run time and the real
``contextlib`` for the type checker only. The ``with`` statement's protocol
is contextlib's own (3.11's ``_GeneratorContextManager``, the same cases
in the same order): the generator's value is the ``as`` target, an
exception in the block is thrown into the generator at its ``yield``, what
the generator does with it (re-raise, raise another, swallow) is what the
``with`` statement does. Not kept: using the result as a function decorator
(nobody does). tests/test_contextgen.py holds the two side by side.
"""
from __future__ import annotations


class _GeneratorContextManager:
    __slots__ = ("gen",)

    def __init__(self, gen):
        self.gen = gen

    def __enter__(self):
        try:
            return next(self.gen)
        except StopIteration:
            raise RuntimeError("generator didn't yield") from None

    def __exit__(self, typ, value, traceback):
        if typ is None:
            try:
                next(self.gen)
            except StopIteration:
                return False
            try:
                raise RuntimeError("generator didn't stop")
            finally:
                self.gen.close()
        if value is None:
            value = typ()       # an instance: to tell whether it comes back
        try:
            self.gen.throw(typ, value, traceback)
        except StopIteration as exc:
            # swallowed by the generator, unless it is the block's own StopIteration
            return exc is not value
        except RuntimeError as exc:
            if exc is value:
                exc.__traceback__ = traceback
                return False
            if isinstance(value, StopIteration) and exc.__cause__ is value:
                value.__traceback__ = traceback     # (PEP 479's wrapping)
                return False
            raise
        except BaseException as exc:
            if exc is not value:
                raise
            exc.__traceback__ = traceback
            return False
        try:
            raise RuntimeError("generator didn't stop after throw()")
        finally:
            self.gen.close()


def contextmanager(func):
    """``@contextlib.contextmanager``: ``func`` a generator function that
    yields once."""
    def helper(*args, **kwds):
        return _GeneratorContextManager(func(*args, **kwds))

    for attr in ("__module__", "__name__", "__qualname__", "__doc__", "__annotations__"):
        try:
            setattr(helper, attr, getattr(func, attr))
        except AttributeError:
            pass
    helper.__dict__.update(func.__dict__)
    helper.__wrapped__ = func       # type: ignore[attr-defined]
    return helper
