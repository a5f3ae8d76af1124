"""The ``safety-patch`` command: a thin table of subcommands over plain functions.

Each command parses flags, calls one importable function, prints its result. Errors the
user can fix are ``SafetyPatchError``: one line on stderr, exit code 2, the traceback only
with ``--debug``.

One module per stage's commands; :mod:`.app` holds the typer app, its groups and the options
and flag parsers they share; :mod:`.runner` runs a command line (one error line and an exit
code, the closing summary line, SIGTERM as Ctrl-C, a repeated option refused). Importing the
command modules registers their commands, in the order ``--help`` lists them.
"""

from . import model, train, evaluate, runs, data, patch, gate  # noqa: F401, I001 (registers the commands, in --help order)
from .runner import main

__all__ = ["main"]
