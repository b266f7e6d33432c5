"""The lighter path past argparse (blkjobs.cli.quickparse): a plain
command line of convert, info, map, check or compare parses to what
argparse gives, anything else is left to argparse, and the table it reads
is what the parsers say today."""
from __future__ import annotations

import pytest

from blkjobs.cli import main as cli
from blkjobs.cli import quickparse, quickparse_gen

QUICK = [
    ["convert", "a", "b"],
    ["convert", "-O", "qcow2", "a", "b"],
    ["convert", "-p", "-O", "qcow2", "-f", "raw", "a", "b"],
    ["convert", "a", "b", "c"],
    ["convert", "a", "-O", "qcow2", "b", "-F", "qcow2", "-B", "base"],
    ["convert", "--object", "secret,id=s,data=x", "--object", "o2", "a", "b"],
    ["convert", "-t", "none", "-T", "none", "-m", "8", "-W", "-S", "0", "-r", "10M", "a", "b"],
    ["convert", "-U", "--force-share", "-q", "-n", "--target-is-zero", "a", "b"],
    ["convert", "--image-opts", "driver=raw,file.filename=a", "b"],
    ["convert", "-c", "-O", "qcow2", "--bitmaps", "--skip-broken-bitmaps", "a", "b"],
    ["convert", "--request-size=4M", "--salvage", "-C", "-l", "s1", "a", "b"],
    ["convert", "-O", "raw", "nbd+unix:///?socket=/tmp/s", ""],
    ["info", "a"],
    ["info", "--output", "json", "a"],
    ["info", "--output=json", "--backing-chain", "-U", "a"],
    ["info", "-f", "qcow2", "--object", "secret,id=k,data=p", "a"],
    ["map", "a"],
    ["map", "--output", "json", "-s", "1M", "-l", "2M", "a"],
    ["map", "--start-offset", "0", "--max-length=4k", "-f", "raw", "a"],
    ["check", "a"],
    ["check", "-r", "all", "--output", "json", "-q", "-T", "none", "a"],
    ["check", "-r", "leaks", "--image-opts", "driver=qcow2,file.filename=a"],
    ["compare", "a", "b"],
    ["compare", "-s", "-q", "-f", "raw", "-F", "qcow2", "-p", "--progress-json", "a", "b"],
    ["compare", "-T", "none", "-U", "a", "b"],
]

ARGPARSE = [
    [], ["-h"], ["--version"], ["-v", "convert", "a", "b"], ["--log-level", "debug", "info", "a"],
    ["create", "a", "1M"], ["bogus", "a"],
    ["convert", "-h"], ["convert", "--help", "a", "b"], ["convert", "a"], ["convert"],
    ["convert", "-o", "cluster_size=4k", "-O", "qcow2", "a", "b"], ["convert", "-o", "help"],
    ["convert", "-Oqcow2", "a", "b"], ["convert", "-O=qcow2", "a", "b"],
    ["convert", "--progress-fd", "3", "a", "b"], ["convert", "--", "a", "b"],
    ["convert", "a", "b", "-O"], ["convert", "--forc", "a", "b"], ["convert", "-pU", "a", "b"],
    ["convert", "-O", "-x", "a", "b"], ["convert", "-", "b"], ["convert", "-c=1", "a", "b"],
    ["convert", "--bitmaps=yes", "a", "b"], ["convert", "-f", "--", "a", "b"],
    ["info", "--output", "xml", "a"], ["info", "a", "b"], ["info"], ["info", "--out", "json", "a"],
    ["map", "-5", "a"], ["check", "-r", "some", "a"], ["compare", "-s", "a"],
    ["compare", "a", "b", "c"],
]


def _argparse(argv: list[str]):
    return cli.build_parser(argv).parse_args(argv)


@pytest.mark.parametrize("argv", QUICK, ids=" ".join)
def test_a_plain_command_line_parses_as_argparse_parses_it(argv):
    ns = quickparse.parse(argv)
    assert ns is not None
    assert vars(ns) == vars(_argparse(argv))


@pytest.mark.parametrize("argv", ARGPARSE, ids=" ".join)
def test_anything_else_is_left_to_argparse(argv):
    assert quickparse.parse(argv) is None


def test_the_table_is_current():
    assert quickparse_gen.PATH.read_text() == quickparse_gen.render(), \
        "stale: run `make man` and commit src/blkjobs/cli/quickparse_table.py"


def test_namespace_behaves_as_argparses():
    import argparse
    kw = {"a": 1, "b": [2]}
    ours, theirs = quickparse.Namespace(**kw), argparse.Namespace(**kw)
    assert (repr(ours), "a" in ours, "c" in ours) == (repr(theirs), True, False)
    assert ours == quickparse.Namespace(**kw) and ours != quickparse.Namespace(a=1)
