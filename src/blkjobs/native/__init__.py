"""C bindings layer: typed Python wrappers over the C data path in csrc/.

Only :mod:`blkjobs.native._lib` imports the compiled extension; the modules
here expose Python types (ints, bytes, memoryviews, dataclasses) and raise
:class:`blkjobs.errors.BlkjobsError` subclasses. No cffi object leaks out.
"""
