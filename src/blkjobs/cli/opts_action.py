"""The ``-o`` option of ``create`` and ``convert`` (an argparse action: in a
module of its own, imported when the parser is built, so that a command line
read without argparse (:mod:`.quickparse`) does not import it)."""
from __future__ import annotations

import argparse

from ..units import valid_option_list
from .opts_help import wants_help

TYPE_CHECKING = False     # typing.TYPE_CHECKING without importing typing (start-up)
if TYPE_CHECKING:
    from typing import Any


class OptsAction(argparse._AppendAction):
    """``-o`` (appended); ``-o help`` marks the parse so that missing
    operands do not stop it (:func:`.opts_help.operands_missing`). An invalid option
    list (``a,``, ``,b``) ends the reading of ``-o`` as qemu-img's does (it
    stops there): the command refuses it first (:func:`.opts_help.check_lists`)."""
    def __call__(self, parser: Any, namespace: Any, values: Any, option_string: Any = None):
        if getattr(namespace, "_invalid_opts", None) is not None:
            return
        if not valid_option_list(values):
            namespace._invalid_opts = values
            parser._opts_help_ns = namespace
            return
        super().__call__(parser, namespace, values, option_string)
        if wants_help(getattr(namespace, self.dest)):
            parser._opts_help_ns = namespace
