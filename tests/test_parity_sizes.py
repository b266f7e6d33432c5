"""qemu-img's view of sizes and allocation that qemu-iotests 150, 221 and
253 check: a raw file's size is shown in whole 512-byte sectors (QEMU's
block layer rounds a file's length up), the part past the real end of file
is a hole, and a raw target that convert creates has its first block
allocated (QEMU's file driver does it for its alignment probing). Byte for
byte against the real qemu-img (``twins`` of test_parity_invocation)."""
from __future__ import annotations

import os

import pytest

from qemu_oracle import qemu_io
from test_parity_invocation import run, same, twins  # noqa: F401  (twins: a fixture)


def test_map_and_info_of_unaligned_raw_round_up_to_a_sector(twins): 
    for d in twins:
        with open(d / "u.raw", "wb") as f:
            f.truncate(65537)
    same(twins, "map", "-f", "raw", "--output=json", "u.raw")
    same(twins, "info", "-f", "raw", "u.raw")
    same(twins, "info", "--image-opts", "--output=json", "driver=raw,file.filename=u.raw")
    for d in twins:
        qemu_io(d / "u.raw", "write -P 7 65536 1", fmt="raw")
        assert os.path.getsize(d / "u.raw") == 65537
    out = same(twins, "map", "-f", "raw", "--output=json", "u.raw")[1]
    assert '{ "start": 65537, "length": 511, "depth": 0, "present": true, "zero": true' in out
    same(twins, "map", "-f", "raw", "--output=json", "-s", "60000", "-l", "5538", "u.raw")
    same(twins, "map", "-f", "raw", "--output=json", "-s", "65537", "u.raw")
    # O_DIRECT: the data run at the end of the file covers its whole sector
    out = same(twins, "map", "--output=json", "--image-opts",
               "driver=raw,file.driver=file,file.filename=u.raw,cache.direct=on")[1]
    assert '"start": 65536, "length": 512, "depth": 0, "present": true, "zero": false' in out


@pytest.mark.parametrize("sparse", ["512", "0", "4096"])
def test_convert_to_new_raw_allocates_its_first_block(twins, sparse):
    src = "json:{ 'driver': 'null-co', 'size': 1048576, 'read-zeroes': true }"
    same(twins, "convert", "-O", "raw", "-S", sparse, src, "t.raw")
    out = same(twins, "map", "-f", "raw", "t.raw")[1]
    assert out.splitlines()[1].split()[:2] == (["0", "0x1000"] if sparse != "0"
                                              else ["0", "0x100000"])
    small = "json:{ 'driver': 'null-co', 'size': 2048, 'read-zeroes': true }"
    same(twins, "convert", "-O", "raw", small, "s.raw")
    same(twins, "map", "-f", "raw", "--output=json", "s.raw")
