"""Command line (``blkjobs``), in qemu-img's conventions.

Each ``cmd_<name>.py`` module here defines one subcommand with
``register(subparsers)``; :mod:`blkjobs.cli.main` discovers them, so adding a
command touches no other file.
"""

_progname = "blkjobs"


def progname() -> str:
    """The name messages start with: as QEMU's tools, the name the program
    was invoked as (a symlink named ``qemu-img`` says ``qemu-img:``)."""
    return _progname


def set_progname(argv0: str) -> None:
    """Take the name from ``argv[0]`` (``python -m blkjobs`` stays ``blkjobs``)."""
    global _progname
    base = argv0.rsplit("/", 1)[-1]
    _progname = base if base and not base.endswith(".py") else "blkjobs"
    from .. import errors
    errors.program_name = _progname
