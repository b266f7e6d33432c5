"""blkjobs demo [DIR]: make a VM-shaped sparse image, copy it with a live
progress bar, and prove the copy equal (our compare and qemu-img's)."""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time

from ..imageops.compare import compare_raw
from ..imageops.convert_base import ConvertOptions
from ..imageops.convert_raw import convert_raw
from ..imageops.vmimage import make_vm_image
from .copy_progress import CopyProgress
from ..units import human, parse_size


def register(sub):
    p = sub.add_parser("demo", help="copy a built-in VM-shaped demo image and verify it")
    p.add_argument("dir", nargs="?", help="where to put the images (default: a temporary "
                   "folder, removed afterwards)")
    p.add_argument("--size", default="2G", help="virtual size of the demo image (default 2G)")
    p.set_defaults(func=run)


def run(args) -> int:
    size = parse_size(args.size, "size", 1 << 20)
    tmp = None
    d = args.dir
    if d is None:
        tmp = d = tempfile.mkdtemp(prefix="blkjobs-demo-")
    try:
        src, dst = os.path.join(d, "vm-disk.raw"), os.path.join(d, "vm-disk-copy.raw")
        print(f"1. Making a VM-shaped sparse image of {human(size)}: {src}")
        lay = make_vm_image(src, size)
        st = os.stat(src)
        print(f"   data {human(lay.data)}, zeroes written as data {human(lay.zero)}, "
              f"holes {human(lay.hole)}; {human(st.st_blocks * 512)} on disk")
        print(f"2. blkjobs convert -p {src} {dst}", flush=True)
        prog = CopyProgress()
        t0 = time.monotonic()
        res = convert_raw(src, dst, ConvertOptions(), progress=prog.update)
        prog.finish()
        dt = time.monotonic() - t0
        print(f"   {human(size)} in {dt:.2f} s; wrote {human(res.data_bytes)} of data, "
              f"{human(res.zero_bytes)} stayed or became holes; copy uses "
              f"{human(os.stat(dst).st_blocks * 512)} on disk")
        print("3. Comparing source and copy")
        r = compare_raw(src, dst)
        print(f"   blkjobs compare: {'Images are identical.' if r.identical else f'DIFFER at {r.offset}'}")
        ok = r.identical
        if shutil.which("qemu-img"):
            q = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", src, dst],
                               capture_output=True, text=True)
            print(f"   qemu-img compare: {q.stdout.strip() or q.stderr.strip()}")
            ok = ok and q.returncode == 0
        print("Demo " + ("passed." if ok else "FAILED."))
        return 0 if ok else 1
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
