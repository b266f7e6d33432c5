"""cffi build script: compiles csrc/*.c into the extension ``blkjobs._core``.

Each public header in csrc/ marks the declarations cffi must see between the
lines ``/* cdef-begin */`` and ``/* cdef-end */``; everything else (include
guards, includes, macros) stays C-only.
"""
import os
import pathlib

from cffi import FFI

HERE = pathlib.Path(__file__).resolve().parent


def _headers():
    # A header is part of the API when its .c file exists beside it.
    return [h for h in sorted(HERE.glob("*.h")) if h.with_suffix(".c").exists()]


def _cdefs():
    out = []
    for header in _headers():
        text = header.read_text()
        if "/* cdef-begin */" not in text:
            continue
        body = text.split("/* cdef-begin */", 1)[1].split("/* cdef-end */", 1)[0]
        out.append(body)
    return "\n".join(out)


ffibuilder = FFI()
ffibuilder.cdef(_cdefs())
_sources = sorted(str(p.relative_to(HERE.parent)) for p in HERE.glob("*.c"))
ffibuilder.set_source(
    "blkjobs._core",
    "\n".join(f'#include "{h.name}"' for h in _headers()),
    sources=_sources,
    include_dirs=[str(HERE.relative_to(HERE.parent))],
    extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wextra", "-Wno-unused-parameter",
                        "-D_GNU_SOURCE", "-D_FILE_OFFSET_BITS=64"]
    + os.environ.get("BLKJOBS_CFLAGS", "").split(),
    extra_link_args=["-pthread"],
    libraries=["z"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
