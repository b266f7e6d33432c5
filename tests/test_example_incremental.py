"""examples/incremental_backup.py runs: full backup, incrementals with
qemu-io writes in between, one more incremental in a new process (the
bitmap is read back from the image), restore, qemu-img compare."""
from __future__ import annotations

import os
import subprocess
import sys

from qemu_oracle import check_clean, qemu_img, qemu_map

EXAMPLE = os.path.join(os.path.dirname(__file__), "..", "examples", "incremental_backup.py")


def test_incremental_backup_example(tmp_path):
    d = tmp_path / "bk"
    p = subprocess.run([sys.executable, EXAMPLE, str(d)], capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stderr == ""
    lines = p.stdout.splitlines()
    assert lines[-1] == f"restored 5 backups into {d / 'restored.raw'}: identical to the disk"
    # the last incremental (new process) holds exactly the 2 MiB written before it
    assert "04-incremental.qcow2: 2097152 bytes changed since 03-incremental.qcow2" in lines
    top = [(r["start"], r["length"]) for r in qemu_map(d / "04-incremental.qcow2")
           if r["depth"] == 0 and r["present"]]
    assert top == [(20 << 20, 2 << 20)]
    assert qemu_img("compare", "-f", "qcow2", "-F", "raw", d / "disk.qcow2",
                    d / "restored.raw").returncode == 0
    for name in os.listdir(d):
        if name.endswith(".qcow2"):
            check_clean(d / name)
