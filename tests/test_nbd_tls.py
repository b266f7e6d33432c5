"""TLS on a TCP export (``object-add tls-creds-x509`` + ``nbd-server-start
tls-creds``): certificates made here with openssl; a client with the right
CA and a client certificate (nbdinfo/nbdcopy with ``nbds://``, qemu-img
with ``--object tls-creds-x509``) reads the export; a plaintext client, and
one trusting another CA, are refused -- and see no data."""
from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import struct
import subprocess
import time
from collections.abc import Iterator

import pytest
from conftest import BLKJOBS, run_blkjobs
from daemon_util import TIMEOUT, connect, qcow2_node, qemu_img, qemu_io, start_blkjobs
from nbd_peers import handshake, option, run, tool
from test_nbd_client import one_line_error


def _openssl(*args: str, cwd) -> None:
    p = subprocess.run([tool("openssl"), *args], cwd=cwd, capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 0, p.stderr


def make_ca(d, name: str) -> None:
    d.mkdir()
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
             "-subj", f"/CN={name}", "-keyout", "ca-key.pem", "-out", "ca-cert.pem",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=d)


def make_cert(ca, out, role: str) -> None:
    """``role``-cert.pem and ``role``-key.pem (server: for 127.0.0.1) in
    ``out``, signed by the CA in ``ca``; ``out`` gets the CA's certificate."""
    out.mkdir(exist_ok=True)
    shutil.copy(ca / "ca-cert.pem", out / "ca-cert.pem")
    usage = "serverAuth" if role == "server" else "clientAuth"
    ext = out / f"{role}.ext"
    ext.write_text(f"basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n"
                   f"extendedKeyUsage={usage}\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n")
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={role}",
             "-keyout", f"{role}-key.pem", "-out", f"{role}.csr", cwd=out)
    _openssl("x509", "-req", "-in", f"{role}.csr", "-CA", str(ca / "ca-cert.pem"),
             "-CAkey", str(ca / "ca-key.pem"), "-CAcreateserial", "-days", "2",
             "-extfile", str(ext), "-out", f"{role}-cert.pem", cwd=out)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def pki(tmp_path):
    make_ca(tmp_path / "ca", "blkjobs test CA")
    make_ca(tmp_path / "other-ca", "some other CA")
    make_cert(tmp_path / "ca", tmp_path / "server", "server")
    make_cert(tmp_path / "ca", tmp_path / "client", "client")
    make_cert(tmp_path / "other-ca", tmp_path / "stranger", "client")
    return tmp_path


def test_tls_export_needs_the_right_certificates(pki):
    img = str(pki / "disk.qcow2")
    assert qemu_img("create", "-f", "qcow2", img, "4M").returncode == 0
    qemu_io(img, "write -P 0x5c 1M 1M")
    port = free_port()
    daemon = start_blkjobs(pki)

    async def scenario():
        s = await connect(daemon.sock)
        try:
            await s.x("blockdev-add", **qcow2_node("disk", img))
            await s.x("object-add", **{"qom-type": "tls-creds-x509", "id": "tls0",
                                       "dir": str(pki / "server"), "endpoint": "server"})
            await s.x("nbd-server-start", **{"tls-creds": "tls0"},
                      addr={"type": "inet", "data": {"host": "127.0.0.1", "port": str(port)}})
            await s.x("block-export-add", type="nbd", id="e0", **{"node-name": "disk"})
            await s.x("object-add", **{"qom-type": "tls-creds-x509", "id": "c0",
                                       "dir": str(pki / "client"), "endpoint": "client"})
            # as in QEMU, the server keeps the credentials it started with
            await s.x("object-del", id="tls0")
            return await asyncio.to_thread(clients)
        finally:
            await s.close()

    def clients() -> dict:
        out = {}
        good = f"nbds://127.0.0.1:{port}/disk?tls-certificates={pki / 'client'}"
        run("nbdcopy", good, str(pki / "copy.raw"))
        out["copy"] = (pki / "copy.raw").read_bytes()
        out["info"] = run("nbdinfo", good).stdout
        p = run("qemu-img", "convert", "-O", "raw", "--object",
                f"tls-creds-x509,id=tls0,dir={pki / 'client'},endpoint=client",
                "--image-opts", f"driver=nbd,host=127.0.0.1,port={port},export=disk,"
                "tls-creds=tls0", str(pki / "qemu-img.raw"))
        out["qemu-img"] = (pki / "qemu-img.raw").read_bytes()
        out["plain"] = run("nbdinfo", f"nbd://127.0.0.1:{port}/disk", check=False)
        out["plain-copy"] = run("nbdcopy", f"nbd://127.0.0.1:{port}/disk",
                                str(pki / "plain.raw"), check=False)
        out["stranger"] = run("nbdinfo", f"nbds://127.0.0.1:{port}/disk?tls-certificates="
                                         f"{pki / 'stranger'}", check=False)
        out["no-client-cert"] = run(
            "nbdinfo", f"nbds://127.0.0.1:{port}/disk?tls-certificates={pki / 'ca'}",
            check=False)
        assert p.returncode == 0
        # raw: every option but STARTTLS and ABORT gets NBD_REP_ERR_TLS_REQD,
        # NBD_OPT_EXPORT_NAME (no way to refuse it) closes the connection
        c = handshake(("127.0.0.1", port))
        name = b"disk"
        out["raw"] = [option(c, 7, struct.pack(">I", len(name)) + name + b"\0\0")[0],
                      option(c, 3)[0], option(c, 8)[0]]
        c.sendall(struct.pack(">QII", 0x49484156454F5054, 1, len(name)) + name)
        out["raw-eof"] = c.recv(1)
        c.close()
        return out
    try:
        out = asyncio.run(scenario())
    finally:
        assert daemon.stop() == 0, daemon.stderr
    expected = bytes(1 << 20) + b"\x5c" * (1 << 20) + bytes(2 << 20)
    assert out["copy"] == out["qemu-img"] == expected
    assert "protocol: newstyle-fixed with TLS" in out["info"]
    for key in ("plain", "plain-copy", "stranger", "no-client-cert"):
        assert out[key].returncode != 0, (key, out[key])
    # the plaintext client is refused at NBD_OPT_GO (libnbd says ENOTSUP
    # for NBD_REP_ERR_TLS_REQD)
    assert "server replied with error to opt_go request" in out["plain"].stderr
    assert out["raw"] == [(1 << 31) | 5] * 3
    assert out["raw-eof"] == b""
    assert not (pki / "plain.raw").exists() or (pki / "plain.raw").read_bytes() != expected


def test_tls_object_errors(tmp_path):
    """The texts of QEMU's tls-creds-x509 and nbd-server-start checks."""
    daemon = start_blkjobs(tmp_path)

    async def scenario():
        s = await connect(daemon.sock)
        try:
            r = [await s.err("object-add", **{"qom-type": "tls-creds-x509", "id": "t0",
                                              "dir": str(tmp_path / "none"),
                                              "endpoint": "server"}),
                 await s.err("object-add", **{"qom-type": "tls-creds-x509", "id": "c0",
                                              "dir": str(tmp_path), "endpoint": "client",
                                              "verify-peer": False}),
                 await s.err("nbd-server-start", **{"tls-creds": "t0"}, addr={
                     "type": "unix", "data": {"path": str(tmp_path / "n.sock")}}),
                 await s.err("object-del", id="t0")]
            return r
        finally:
            await s.close()
    try:
        r = asyncio.run(scenario())
    finally:
        assert daemon.stop() == 0, daemon.stderr
    # qemu-storage-daemon 7.2's texts
    assert r == [("GenericError", "Unable to access credentials "
                  f"{tmp_path / 'none'}/ca-cert.pem: No such file or directory"),
                 ("GenericError", "Unable to access credentials "
                  f"{tmp_path}/ca-cert.pem: No such file or directory"),
                 ("GenericError", "No TLS credentials with id 't0'"),
                 ("GenericError", "object 't0' not found")]


@contextlib.contextmanager
def qemu_nbd_x509(image: str, creds, port: int) -> Iterator[subprocess.Popen]:
    """``qemu-nbd`` serving ``image`` (raw, read-only) on 127.0.0.1:``port``
    with x509 credentials from ``creds`` (client certificates verified)."""
    proc = subprocess.Popen(
        [tool("qemu-nbd"), "-t", "-r", "-e", "4", "-f", "raw", "-b", "127.0.0.1", "-p",
         str(port), "--object", f"tls-creds-x509,id=tls0,dir={creds},endpoint=server",
         "--tls-creds", "tls0", image],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + TIMEOUT
        while True:             # until it listens (a probe client leaves at once)
            assert proc.poll() is None, "qemu-nbd exited"
            try:
                socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT).close()
                break
            except ConnectionRefusedError:
                assert time.monotonic() < deadline, "qemu-nbd did not listen"
                time.sleep(0.02)
        yield proc
    finally:
        proc.terminate()
        proc.wait(TIMEOUT)


def test_client_x509_against_qemu_nbd(pki):
    """Our client (libnbd under it) with x509 certificates against qemu-nbd
    with tls-creds-x509: reads the export with the right CA and client
    certificate (in the URI or BLKJOBS_NBD_TLS_CERTIFICATES), as qemu-img
    does; a CA that did not sign the server's certificate, a client
    certificate the server's CA did not sign and plaintext are refused in
    one line, and no target is left behind."""
    img = pki / "disk.raw"
    data = b"".join(bytes([i]) * (256 << 10) for i in range(16))
    img.write_bytes(data)
    # trusts another CA, though its own certificate is one the server accepts
    (pki / "mixed").mkdir()
    shutil.copy(pki / "other-ca" / "ca-cert.pem", pki / "mixed" / "ca-cert.pem")
    for f in ("client-cert.pem", "client-key.pem"):
        shutil.copy(pki / "client" / f, pki / "mixed" / f)
    port = free_port()
    base = f"nbds://127.0.0.1:{port}/"
    with qemu_nbd_x509(str(img), pki / "server", port):
        run_blkjobs("convert", f"{base}?tls-certificates={pki / 'client'}",
                    pki / "ours.raw", check=True)
        env = dict(os.environ, BLKJOBS_NBD_TLS_CERTIFICATES=str(pki / "client"))
        info = subprocess.run([*BLKJOBS, "info", base], capture_output=True, text=True,
                              env=env, timeout=120)
        p = run("qemu-img", "convert", "-O", "raw", "--object",
                f"tls-creds-x509,id=t,dir={pki / 'client'},endpoint=client", "--image-opts",
                f"driver=nbd,host=127.0.0.1,port={port},tls-creds=t", str(pki / "qemu.raw"))
        mixed = run_blkjobs("convert", f"{base}?tls-certificates={pki / 'mixed'}",
                            pki / "mixed.raw")
        stranger = run_blkjobs("info", f"{base}?tls-certificates={pki / 'stranger'}")
        plain = run_blkjobs("info", f"nbd://127.0.0.1:{port}/")
    assert p.returncode == 0
    assert (pki / "ours.raw").read_bytes() == (pki / "qemu.raw").read_bytes() == data
    assert info.returncode == 0, info.stderr
    assert info.stdout.splitlines()[:3] == [
        f"image: nbd://127.0.0.1:{port}", "file format: raw",
        f"virtual size: 4 MiB ({len(data)} bytes)"]
    # the client checks the server's certificate (libnbd does over TCP):
    # libnbd's words, not a connection reset
    line = one_line_error(mixed)
    assert line.startswith(f"blkjobs: Could not open '{base}?tls-certificates="), line
    assert "gnutls_handshake: Error in the certificate verification" in line, line
    assert not (pki / "mixed.raw").exists()
    assert one_line_error(stranger).startswith(f"blkjobs: Could not open '{base}")
    assert one_line_error(plain) == (f"blkjobs: Could not open 'nbd://127.0.0.1:{port}/': "
                                     "handshake: server requires TLS encryption first: "
                                     "Operation not supported")
