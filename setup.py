# The only job of setup.py: build the cffi extensions from csrc/: blkjobs._core
# always, blkjobs._nbd (the NBD client over libnbd) where libnbd-dev is installed.
import os
import sys

from setuptools import setup

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc"))
from build_ffi import isal_available as _isal_available  # noqa: E402
from build_nbd import available as _nbd_available  # noqa: E402

_modules = ["csrc/build_ffi.py:ffibuilder"]
if _nbd_available():
    _modules.append("csrc/build_nbd.py:ffibuilder")
else:
    print("blkjobs: libnbd's header not found (Debian: libnbd-dev): building without "
          "the NBD client", file=sys.stderr)
if not _isal_available():
    print("blkjobs: ISA-L's header not found (Debian: libisal-dev): compressed qcow2 "
          "clusters are deflated with zlib (slower)", file=sys.stderr)
# The extensions use only the stable ABI (cffi builds them with Py_LIMITED_API),
# so one wheel, tagged cp311-abi3, serves Python 3.11 and every later 3.x.
setup(cffi_modules=_modules,
      options={"bdist_wheel": {"py_limited_api": "cp311"}})
