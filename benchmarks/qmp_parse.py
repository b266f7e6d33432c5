"""Time blkjobs' QMP reader on one request carrying a big string, fed in
64 KiB reads as the daemon does: the time must grow linearly with the size.

    .venv/bin/python benchmarks/qmp_parse.py 1 2 4 8 60     # sizes in MiB
"""
import sys
import time

from blkjobs.daemon.protocol import JsonStreamer, parse


def run(mib: int) -> float:
    msg = (b'{"execute": "query-version", "arguments": {"x": "' + b"a" * (mib << 20)
           + b'"}}')
    t = time.perf_counter()
    s = JsonStreamer()
    out = []
    for i in range(0, len(msg), 65536):
        out += s.feed(msg[i:i + 65536])
    [(toks, err)] = out
    value, err = parse(toks)
    assert err is None and len(value["arguments"]["x"]) == mib << 20
    return time.perf_counter() - t


if __name__ == "__main__":
    for arg in sys.argv[1:] or ["1", "2", "4", "8", "60"]:
        mib = int(arg)
        dt = run(mib)
        print(f"{mib:4d} MiB  {dt:6.2f} s  {mib / dt:7.1f} MiB/s")
