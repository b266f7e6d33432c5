"""The parser of qemu-img's image-name syntaxes (graph/blockspec.py), as
functions."""
from __future__ import annotations


import pytest

from blkjobs.errors import ImageError
from blkjobs.graph import blockspec
from blkjobs.formats.sniff import mark_image_opts
from blkjobs.graph.blockspec import parse, parse_opts, qdict_json, read_blkdebug_config, unflatten
from blkjobs.graph.qemu_json import parse_json


def test_option_strings():
    assert parse_opts("driver=qcow2,file.filename=a,,b.qcow2,read-only") == {
        "driver": "qcow2", "file.filename": "a,b.qcow2", "read-only": "on"}


def test_dotted_and_nested_keys_merge():
    tree = unflatten({"driver": "blkdebug", "image.driver": "qcow2",
                      "image": {"file.filename": "x"}, "inject-error.0.event": "read_aio",
                      "inject-error.1.event": "write_aio"})
    assert tree == {"driver": "blkdebug",
                    "image": {"driver": "qcow2", "file": {"filename": "x"}},
                    "inject-error": [{"event": "read_aio"}, {"event": "write_aio"}]}


def test_qemu_json():
    """Single-quoted strings, as QEMU's parser takes them, and escapes."""
    assert parse_json("{'a': 'it\\'s \"q\"', \"b\": [1, -2.5, true, null]}") == {
        "a": "it's \"q\"", "b": [1, -2.5, True, None]}


@pytest.mark.parametrize("text, why", [
    ("{", "Could not parse the JSON options: JSON parse error, premature EOI"),
    ("", "Could not parse the JSON options: Expecting a JSON value"),
    ("[1]", "Invalid JSON object given"),
    ("{x}", "Could not parse the JSON options: JSON parse error, invalid keyword 'x'"),
])
def test_bad_json(text, why):
    with pytest.raises(ImageError) as e:
        parse_json(text)
    assert str(e.value) == why


def test_qdict_key_order():
    """QEMU prints a QDict's keys by hash bucket (what qemu-img info shows
    of a json: name)."""
    assert qdict_json({"driver": "raw", "size": 1024, "file": {"filename": "a", "driver": "file"},
                       "offset": 512}) == ('{"offset": 512, "driver": "raw", "size": 1024, '
                                           '"file": {"driver": "file", "filename": "a"}}')


def test_display_names():
    assert parse("json:{'driver':'qcow2','file.filename':'a.qcow2'}").display == "a.qcow2"
    assert parse("file:x:y.qcow2").display == "./x:y.qcow2"
    assert parse("file:d/x:y.qcow2").display == "d/x:y.qcow2"
    assert parse("json:{'driver':'null-co'}").display == "null-co://"
    mark_image_opts("driver=null-co,size=4096")
    spec = parse("driver=null-co,size=4096")
    assert spec.display == 'json:{"driver": "null-co", "size": "4096"}'
    drv, fmt = blockspec.open_spec(spec)
    buf = bytearray(b"x" * 8)
    drv.readinto(0, buf)
    assert (fmt, drv.size, buf) == ("null-co", 4096, bytes(8))


def test_blkdebug_config(tmp_path):
    conf = tmp_path / "b.conf"
    conf.write_text('[inject-error]\nevent = "read_aio"\nerrno = "28"\nonce ="on"\nsector = "8"\n'
                    '\n[set-state]\nstate = "1"\nevent = "write_aio"\nnew_state = "2"\n')
    assert read_blkdebug_config(str(conf)) == [
        ("inject-error", {"event": "read_aio", "errno": 28, "once": True, "sector": 8}),
        ("set-state", {"state": 1, "event": "write_aio", "new_state": 2})]
    with pytest.raises(ImageError, match=r"^Could not read blkdebug config file: No such file"):
        read_blkdebug_config(str(tmp_path / "missing"))
