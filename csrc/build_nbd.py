"""cffi build script of the optional extension ``blkjobs._nbd``: libnbd (the
NBD client library) and csrc/nbd/nbdio.c, the pipelined, time-limited calls
the ``nbd`` driver makes. Built only where libnbd's header is installed
(Debian: libnbd-dev); without it blkjobs builds as before and NBD URIs are
refused with one line (see :mod:`blkjobs.formats.nbd`)."""
import os
import pathlib
import shutil
import subprocess

from cffi import FFI

HERE = pathlib.Path(__file__).resolve().parent / "nbd"


def available() -> bool:
    """libnbd's header and library can be found (pkg-config, else the
    usual include directory)."""
    if shutil.which("pkg-config"):
        r = subprocess.run(["pkg-config", "--exists", "libnbd"], capture_output=True)
        if r.returncode == 0:
            return True
    return os.path.exists("/usr/include/libnbd.h")


def _cdefs() -> str:
    text = (HERE / "nbdio.h").read_text()
    return text.split("/* cdef-begin */", 1)[1].split("/* cdef-end */", 1)[0]


ffibuilder = FFI()
ffibuilder.cdef(_cdefs())
ffibuilder.set_source(
    "blkjobs._nbd",
    '#include "nbdio.h"',
    sources=[str((HERE / "nbdio.c").relative_to(HERE.parent.parent))],
    include_dirs=[str(HERE.relative_to(HERE.parent.parent))],
    libraries=["nbd"],
    extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wextra", "-Wno-unused-parameter",
                        "-D_GNU_SOURCE"] + os.environ.get("BLKJOBS_CFLAGS", "").split(),
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
