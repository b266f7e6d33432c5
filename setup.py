# The only job of setup.py: build the cffi extension blkjobs._core from csrc/.
from setuptools import setup

# The extension uses only the stable ABI (cffi builds it with Py_LIMITED_API),
# so one wheel, tagged cp311-abi3, serves Python 3.11 and every later 3.x.
setup(cffi_modules=["csrc/build_ffi.py:ffibuilder"],
      options={"bdist_wheel": {"py_limited_api": "cp311"}})
