# The only job of setup.py: build the cffi extension blkjobs._core from csrc/.
from setuptools import setup

setup(cffi_modules=["csrc/build_ffi.py:ffibuilder"])
