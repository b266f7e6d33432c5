"""Command line (``blkjobs``), in qemu-img's conventions.

Each ``cmd_<name>.py`` module here defines one subcommand with
``register(subparsers)``; :mod:`blkjobs.cli.main` discovers them, so adding a
command touches no other file.
"""
