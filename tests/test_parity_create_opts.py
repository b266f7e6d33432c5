"""qemu-img create's Formatting line lists the options that were given,
``encryption=off`` too (qemu-iotests 049), byte for byte against the real
qemu-img."""
from __future__ import annotations

import pytest

from test_parity_invocation import same, twins  # noqa: F401  (twins: a fixture)


@pytest.mark.parametrize("opts", ["encryption=off", "encryption=off,cluster_size=4k",
                                  "encryption=off,compat=0.10", "encryption=off,encryption=off"])
def test_create_formatting_line_shows_encryption_off(twins, opts):
    rc, out, _err = same(twins, "create", "-f", "qcow2", "-o", opts, "x.qcow2", "1M")
    assert rc == 0 and " encryption=off " in out
