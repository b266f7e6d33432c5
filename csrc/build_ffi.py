"""cffi build script: compiles csrc/*.c into the extension ``blkjobs._core``.

Each public header in csrc/ marks the declarations cffi must see between the
lines ``/* cdef-begin */`` and ``/* cdef-end */``; everything else (include
guards, includes, macros) stays C-only.
"""
import os
import pathlib
import shutil
import subprocess

from cffi import FFI

HERE = pathlib.Path(__file__).resolve().parent


def isal_available() -> bool:
    """ISA-L's igzip (Debian: libisal-dev) at 2.24 or later (``hist_bits``,
    the 4 KiB window qcow2 needs) can be built against; without it the
    deflate of compressed clusters is zlib's. BLKJOBS_NO_ISAL=1 builds
    without it (the fallback's tests)."""
    if os.environ.get("BLKJOBS_NO_ISAL"):
        return False
    if shutil.which("pkg-config"):
        r = subprocess.run(["pkg-config", "--atleast-version=2.24", "libisal"],
                           capture_output=True)
        return r.returncode == 0
    return os.path.exists("/usr/include/isa-l/igzip_lib.h")


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


_isal = isal_available()
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
    + (["-DBJ_HAVE_ISAL"] if _isal else [])
    + os.environ.get("BLKJOBS_CFLAGS", "").split(),
    extra_link_args=["-pthread"],
    libraries=["z"] + (["isal"] if _isal else []),
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
