# Type stub for the cffi extension that setup.py compiles from csrc/
# (csrc/build_ffi.py). cffi builds `ffi` and `lib` at run time from the C
# declarations, so to a type checker they are opaque: every C function and
# cdata value is Any. Only blkjobs.native imports them.
from typing import Any

ffi: Any
lib: Any
