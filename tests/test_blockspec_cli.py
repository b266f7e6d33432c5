"""qemu-img's image-name syntaxes on the command line (json:, file:,
blkdebug:, --image-opts, --object): blkjobs installed as qemu-img gives the
real qemu-img's exit status, stdout and stderr byte for byte, and the same
images."""
from __future__ import annotations

import json

import pytest

from qemu_oracle import qemu_img, qemu_io
from test_parity_invocation import same, twins  # noqa: F401  (the fixture)


def _both(twins, *args):
    for d in twins:
        qemu_img(*[str(a).replace("DIR", str(d)) for a in args])


@pytest.mark.parametrize("name", [
    "json:{'file.filename':'a.qcow2'}",
    "json:{'driver':'qcow2','file':{'driver':'file','filename':'a.qcow2'}}",
    'json:{"driver": "qcow2", "file": {"filename": "a.qcow2"}, "backing": null}',
    "json:{'driver':'raw','file.filename':'a.qcow2','offset':512,'size':1024}",
    "json:{'driver':'file','filename':'a.qcow2'}",
    "json:{'driver':'null-co'}",
    "json:{'driver':'null-co','size':1048576,'read-zeroes':true}",
    "file:a.qcow2",
])
def test_info_of_json_and_file_names(twins, name):
    _both(twins, "create", "-f", "qcow2", "DIR/a.qcow2", "1M")
    if "'driver':'file'" in name:       # qemu-img shows the file's size rounded up to sectors
        for d in twins:
            with open(d / "a.qcow2", "ab") as f:
                f.truncate(-(-(d / "a.qcow2").stat().st_size // 512) * 512)
    same(twins, "info", name)
    same(twins, "info", "--output=json", name) if "null-co" in name else None


@pytest.mark.parametrize("name", [
    "json:{", "json:", "json:[1]", "json:{x}", 'json:{"a":}', 'json:{"driver":1}',
    "json:{'driver':'foo','file.filename':'a.qcow2'}",
    "json:{'driver':'qcow2'}",
    "json:{'driver':'qcow2','file':'a.qcow2'}",
    "json:{'driver':'qcow2','file':{'driver':'file'}}",
    "json:{'driver':'qcow2','file.filename':'a.qcow2','foo':1}",
    "json:{'driver':'raw','file.filename':'a.qcow2','size':'x'}",
    "json:{'driver':'raw','file.filename':'a.qcow2','offset':2000000}",
    "json:{'driver':'nbd'}",
    "json:{'file.filename':'missing.qcow2'}",
    "file:missing", "blkdebug:missing.conf:a.qcow2",
])
def test_bad_names(twins, name):
    """qemu-img's texts for bad JSON, unknown drivers and options, missing keys."""
    _both(twins, "create", "-f", "qcow2", "DIR/a.qcow2", "1M")
    rc, out, err = same(twins, "info", name)
    assert rc == 1 and err.startswith(f"qemu-img: Could not open '{name}': ")


@pytest.mark.parametrize("opts", [
    "driver=qcow2,file.filename=a.qcow2", "file.filename=a.qcow2",
    "driver=qcow2,file.driver=file,file.filename=a.qcow2,cache.direct=on",
    "driver=qcow2", "driver=foo,file.filename=a.qcow2", "a.qcow2",
    "driver=qcow2,file.filename=a.qcow2,foo=1", "driver=raw,file.filename=a.qcow2,offset=x",
    "driver=null-co,size=1M",
])
def test_image_opts_info_map(twins, opts):
    _both(twins, "create", "-f", "qcow2", "DIR/a.qcow2", "1M")
    for d in twins:
        qemu_io(d / "a.qcow2", "write -P 7 64k 64k")
    same(twins, "info", "--image-opts", opts)
    same(twins, "map", "--output=json", "--image-opts", opts)
    same(twins, "map", "--image-opts", opts)


def test_image_opts_excludes_format(twins):
    same(twins, "info", "-f", "qcow2", "--image-opts", "driver=qcow2,file.filename=a.qcow2")


def test_image_opts_commands(twins):
    """check, compare, bitmap, convert, rebase and commit take option strings."""
    _both(twins, "create", "-f", "qcow2", "DIR/b.qcow2", "1M")
    _both(twins, "create", "-f", "qcow2", "-b", "b.qcow2", "-F", "qcow2", "DIR/a.qcow2")
    for d in twins:
        qemu_io(d / "a.qcow2", "write -P 9 0 64k")
    a, b = "driver=qcow2,file.filename=a.qcow2", "driver=qcow2,file.filename=b.qcow2"
    same(twins, "check", "--image-opts", a)
    same(twins, "compare", "--image-opts", a, b)
    same(twins, "bitmap", "--add", "--image-opts", a, "bm")
    bitmaps = [json.loads(qemu_img("info", "--output=json", d / "a.qcow2").stdout)
               ["format-specific"]["data"]["bitmaps"] for d in twins]
    assert bitmaps[0] == bitmaps[1] != []
    same(twins, "bitmap", "--remove", "--image-opts",
         "driver=qcow2,file.driver=file,file.filename=a.qcow2", "bm")
    same(twins, "convert", "-O", "qcow2", "--image-opts", a, "c.qcow2")
    same(twins, "compare", "a.qcow2", "c.qcow2")
    same(twins, "commit", "--image-opts", a)
    same(twins, "compare", "a.qcow2", "b.qcow2")
    same(twins, "rebase", "-u", "-b", "", "--image-opts", a)
    same(twins, "map", "--output=json", "--image-opts", a)
    for d in twins:
        assert "backing-filename" not in qemu_img("info", "--output=json", d / "a.qcow2").stdout


@pytest.mark.parametrize("sparse", ["512", "0"])
def test_convert_from_null_co(twins, sparse):
    """iotest 150: a null-co source with read-zeroes makes an empty image."""
    src = "json:{ 'driver': 'null-co', 'size': 1048576, 'read-zeroes': true }"
    same(twins, "convert", "-O", "qcow2", "-S", sparse, src, "n.qcow2")
    same(twins, "map", "--output=json", "n.qcow2")
    same(twins, "compare", src, "n.qcow2")
    same(twins, "compare", "json:{'driver':'null-co','size':1048576}", "n.qcow2")


def test_raw_window(twins):
    """raw's offset and size options: a window of the file."""
    for d in twins:
        (d / "f.raw").write_bytes(bytes(range(256)) * 64)
    name = "json:{'driver':'raw','file.filename':'f.raw','offset':4096,'size':8192}"
    same(twins, "convert", "-O", "raw", name, "w.raw")
    assert (twins[0] / "w.raw").read_bytes() == (twins[0] / "f.raw").read_bytes()[4096:12288]
    assert (twins[0] / "w.raw").read_bytes() == (twins[1] / "w.raw").read_bytes()
    same(twins, "map", "--output=json", name)
    same(twins, "compare", name, "w.raw")


def test_file_names_with_colons(twins):
    """iotest 126: file:NAME creates and opens a name with a colon; it shows
    as ./NAME, and a backing file resolves next to it."""
    same(twins, "create", "-f", "qcow2", "base.qcow2", "1M")
    same(twins, "create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "file:image:top.qcow2")
    same(twins, "compare", "file:image:top.qcow2", "base.qcow2")
    for d in twins:     # the same files for info's disk size: qemu-img's
        qemu_img("create", "-f", "qcow2", "-u", "-b", "base.qcow2", "-F", "qcow2",
                 f"file:{d}/image:top.qcow2", "1M")
    same(twins, "info", "file:image:top.qcow2")
    same(twins, "map", "--output=json", "file:image:top.qcow2")


def test_json_backing_in_header(twins):
    """A backing file named json:{...} in the header opens (info, map,
    convert), the name printed with qemu-img's doubled commas."""
    _both(twins, "create", "-f", "qcow2", "DIR/base.qcow2", "1M")
    for d in twins:
        qemu_io(d / "base.qcow2", "write -P 5 0 128k")
    backing = "json:{'driver': 'qcow2', 'file': {'driver': 'file', 'filename': 'base.qcow2'}}"
    same(twins, "create", "-f", "qcow2", "-b", backing, "-F", "qcow2", "top.qcow2", "1M")
    for d in twins:     # the same files for info's disk size: qemu-img's
        qemu_img("create", "-f", "qcow2", "-u", "-b", backing, "-F", "qcow2", d / "top.qcow2", "1M")
    same(twins, "info", "--backing-chain", "top.qcow2")
    same(twins, "map", "--output=json", "top.qcow2")
    same(twins, "convert", "-O", "raw", "top.qcow2", "top.raw")
    assert (twins[0] / "top.raw").read_bytes() == (twins[1] / "top.raw").read_bytes()


_READ_EIO = '[inject-error]\nevent = "read_aio"\nerrno = "5"\nonce ="off"\n'


@pytest.mark.parametrize("size_b", ["1G", "0"])
def test_blkdebug_name_compare_read_error(twins, size_b):
    """iotest 074: blkdebug:CONFIG:IMAGE; a failed read is 'Error while
    reading offset N of NAME', exit 4 (with the size warning when sizes
    differ)."""
    for d in twins:
        (d / "blkdebug.conf").write_text(_READ_EIO)
        qemu_img("create", "-f", "qcow2", d / "a.qcow2", "1G")
        qemu_img("create", "-f", "qcow2", d / "b.qcow2", size_b)
        qemu_io(d / "a.qcow2", "write -P 102 512 512")
    rc, _out, _err = same(twins, "compare", "blkdebug:blkdebug.conf:a.qcow2", "b.qcow2")
    assert rc == 4


def test_blkdebug_backing_commit_fails(twins, monkeypatch):
    """iotest 020: a backing file under blkdebug named in the header; the
    commit into it fails as the rule says, with qemu-img's text."""
    same(twins, "create", "-f", "qcow2", "base.qcow2", "1M")
    backing = ("json:{'driver': 'qcow2', 'file': { 'driver': 'blkdebug', 'inject-error': "
               "[{ 'event': 'write_aio', 'errno': 28, 'once': true }], 'image': "
               "{ 'driver': 'file', 'filename': 'base.qcow2' }}}")
    same(twins, "create", "-f", "qcow2", "-b", backing, "-F", "qcow2", "top.qcow2", "1M")
    for d in twins:
        monkeypatch.chdir(d)        # the backing file's name is relative to the current directory
        qemu_io(d / "top.qcow2", "write -P 1 0 64k")
    rc, _out, err = same(twins, "commit", "top.qcow2")
    assert (rc, err) == (1, "qemu-img: Block job failed: No space left on device\n")
    same(twins, "compare", "-f", "qcow2", "base.qcow2", "json:{'driver':'null-co','size':1048576}")


def test_blkdebug_over_format_map(twins):
    """iotest 204: blkdebug over a qcow2 node, in an option string; map
    names the file."""
    _both(twins, "create", "-f", "qcow2", "DIR/a.qcow2", "4M")
    for d in twins:
        qemu_io(d / "a.qcow2", "write -P 3 1M 1M")
    opts = ("driver=blkdebug,image.driver=qcow2,image.file.driver=file,"
            "image.file.filename=a.qcow2,align=4k")
    same(twins, "map", "--image-opts", opts)
    same(twins, "map", "--output=json", "--image-opts", opts)


@pytest.mark.parametrize("obj", [
    "secret,id=s,data=x", "qom-type=secret,id=s,data=x", "secret,id=s", "secret,data=x",
])
def test_object_texts(twins, obj):
    _both(twins, "create", "-f", "qcow2", "DIR/a.qcow2", "1M")
    same(twins, "info", "--object", obj, "a.qcow2")


def test_object_duplicate_id(twins):
    _both(twins, "create", "-f", "qcow2", "DIR/a.qcow2", "1M")
    rc, _out, err = same(twins, "info", "--object", "secret,id=s,data=x", "--object",
                         "secret,id=s,data=y", "a.qcow2")
    assert rc == 1 and "duplicate" in err


def test_json_info_output_of_null_co(twins):
    rc, out, _err = same(twins, "info", "--output=json", "json:{'driver':'null-co','size':4096}")
    assert rc == 0 and json.loads(out)["format"] == "null-co"


def test_json_name_over_blkdebug_in_a_directory(twins):
    """iotest 110: under a json: name with blkdebug over the file, the
    backing file resolves next to the image's file; qemu-img's name of it
    (the list of rules flattened) and no disk size."""
    for d in twins:
        (d / "sub").mkdir()
    _both(twins, "create", "-f", "qcow2", "DIR/sub/b.qcow2", "1M")
    _both(twins, "create", "-f", "qcow2", "-b", "b.qcow2", "-F", "qcow2", "DIR/sub/t.qcow2")
    name = ("json:{'driver':'qcow2','file':{'driver':'blkdebug','image':{'driver':'file',"
            "'filename':'sub/t.qcow2'},'set-state':[{'event':'read_aio','new_state':42}]}}")
    same(twins, "info", name)
    same(twins, "info", "--output=json", name)
    same(twins, "map", "--output=json", name)


def test_image_opts_resize_dd_measure_snapshot(twins):
    _both(twins, "create", "-f", "qcow2", "DIR/a.qcow2", "1M")
    for d in twins:
        qemu_io(d / "a.qcow2", "write -P 4 0 192k")
    a = "driver=qcow2,file.filename=a.qcow2"
    same(twins, "measure", "-O", "qcow2", "--image-opts", a)
    same(twins, "snapshot", "-l", "--image-opts", a)
    same(twins, "dd", "--image-opts", f"if={a}", "of=o.raw", "bs=64k", "count=2")
    assert (twins[0] / "o.raw").read_bytes() == (twins[1] / "o.raw").read_bytes() == b"\4" * 131072
    same(twins, "resize", "--image-opts", a, "2M")
    same(twins, "compare", "a.qcow2", "json:{'file.filename':'a.qcow2'}")
    qemu_img("compare", twins[0] / "a.qcow2", twins[1] / "a.qcow2")
    same(twins, "map", "--output=json", "a.qcow2")


@pytest.mark.parametrize("cmd", [
    ["info"], ["map"], ["check"], ["compare", "a.qcow2"], ["measure", "-O", "qcow2"],
    ["snapshot", "-l"], ["commit"], ["rebase", "-u", "-b", ""], ["bitmap", "--add"],
    ["resize"], ["convert", "-O", "raw"], ["dd"]])
@pytest.mark.parametrize("name", ["json:{'driver':'foo'}", "file:missing"])
def test_bad_name_in_every_command(twins, cmd, name):
    """Each command names the image, then says why, as qemu-img does."""
    _both(twins, "create", "-f", "qcow2", "DIR/a.qcow2", "1M")
    args = {"bitmap": [name, "bm"], "resize": [name, "2M"], "convert": [name, "o.raw"],
            "dd": [f"if={name}", "of=o.raw"]}.get(cmd[0], [name])
    rc, _out, err = same(twins, *cmd, *args)
    assert rc != 0 and err.startswith(f"qemu-img: Could not open '{name}': ")


@pytest.mark.parametrize("backing", ["null", "'x'", "{'driver':'qcow2','file.filename':'b.qcow2'}"])
def test_backing_option(twins, backing):
    """"backing": null opens the image without its backing file (info still
    names it); a backing given otherwise is refused as qemu-img refuses it."""
    _both(twins, "create", "-f", "qcow2", "DIR/b.qcow2", "1M")
    _both(twins, "create", "-f", "qcow2", "-b", "b.qcow2", "-F", "qcow2", "DIR/a.qcow2")
    for d in twins:
        qemu_io(d / "b.qcow2", "write -P 1 0 64k")
    name = f"json:{{'driver':'qcow2','file.filename':'a.qcow2','backing':{backing}}}"
    same(twins, "info", name)
    same(twins, "map", "--output=json", name)
    same(twins, "compare", name, "json:{'driver':'null-co','size':1048576}")
