"""Running one command line: user errors as one line and exit code 2, an interrupted command's line
(SIGTERM handled as Ctrl-C, so cleanups run), an option given twice refused, and the summary line
every command ends with."""

from __future__ import annotations

import contextlib
import sys
import traceback

import typer

from ..errors import SafetyPatchError
from .app import _STATE, app


def _summary(args: list[str], seconds: float) -> None:
    """The one line every command ends with: what it wrote (its checked outputs that exist) and how long it took."""
    from ..outputs import CHECKED
    from ..progress import duration

    cmd = _command_name(args)
    outs = list(dict.fromkeys(p for p in CHECKED if p.exists()))
    wrote = [str(p) for p in outs if not any(q != p and p.is_relative_to(q) for q in outs)]  # not a stage's inner folder
    if any(a in ("--help", "-h") for a in args) or cmd == "safety-patch":
        return
    typer.echo(f"[{cmd}] {'wrote ' + ', '.join(wrote) + ' ' if wrote else 'done '}in {duration(seconds)}", err=True)


def _command_name(args: list[str]) -> str:
    """The command ``args`` run, as typed: ``train``, ``data build``; ``safety-patch`` when none. Read from
    the first word that names a command or group and, for a group, the next word (an option's value that
    happens to be a command's name, ``train --data data``, once made the line say ``[train data]``)."""
    top = {c.name or c.callback.__name__ for c in app.registered_commands}
    groups = {g.name: {c.name or c.callback.__name__ for c in g.typer_instance.registered_commands}
              for g in app.registered_groups}
    for i, a in enumerate(args):
        if a in top:
            return a
        if a in groups:
            sub = next((b for b in args[i + 1:] if not b.startswith("-")), None)
            return f"{a} {sub}" if sub in groups[a] else a
    return "safety-patch"


def _repeated_option(args: list[str]) -> str | None:
    """The first option of the command ``args`` runs (or of a group above it: ``--threads``) that is
    given twice though it takes one value, as a message; None when there is none. Click keeps the last
    silently: `--rank 4 ... --rank 8` trained rank 8 without a word. Options that take many values
    (``--patch P --patch Q``) may repeat."""
    # typer vendors its own click (typer._click, no public Group/Option names): groups are told by
    # their `commands`, options by their `param_type_name`.
    cmd, i = typer.main.get_command(app), 0
    while True:
        by_name = {o: p for p in cmd.params if p.param_type_name == "option" for o in (*p.opts, *p.secondary_opts)}
        seen: dict[str, str | bool] = {}
        while i < len(args):
            tok = args[i]
            if tok == "--":
                return None
            if not tok.startswith("-") and hasattr(cmd, "commands"):
                break  # the subcommand's name
            i += 1
            name, has_value = (tok.split("=", 1)[0], True) if tok.startswith("--") and "=" in tok else (tok, False)
            p = by_name.get(name)
            if p is None:
                continue
            if not (p.is_flag or p.count or has_value):
                i += 1  # its value, which may itself start with "-"
            if p.multiple or p.count:
                continue
            if p.is_flag and not has_value:  # `--force --force` says one thing; `--x --no-x` two
                said = name in p.secondary_opts
                if seen.setdefault(p.name, said) != said:
                    return f"{' and '.join([*p.opts[:1], *p.secondary_opts[:1]])} are both given; give one of them"
                continue
            if p.name in seen:
                also = "" if seen[p.name] == name else f" (also as {seen[p.name]})"
                return f"{name} is given twice{also}; it takes one value: give it once"
            seen[p.name] = name
        sub = cmd.commands.get(args[i]) if hasattr(cmd, "commands") and i < len(args) else None
        if sub is None:
            return None
        cmd, i = sub, i + 1


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the app, turning user errors into one line and an exit code."""
    args = sys.argv[1:] if argv is None else argv
    import time

    from ..outputs import CHECKED

    if argv is None:  # a real command's process (tests pass argv and keep their own allocator)
        from .. import allocator

        allocator.configure()

    t0 = time.time()
    CHECKED.clear()  # one command's outputs (tests call main() repeatedly in one process)
    with contextlib.suppress(AttributeError, ValueError):  # stage lines reach a log file as they happen
        sys.stdout.reconfigure(line_buffering=True)
    with _sigterm_interrupts() as terminated:
        return _run(args, t0, terminated)


@contextlib.contextmanager
def _sigterm_interrupts():
    """While a command runs, SIGTERM (``kill``, a scheduler's stop, ``timeout``) interrupts it the way
    Ctrl-C does: the cleanups on the way out run (temporary folders of unfinished outputs are
    removed, claims released) and the command says it was terminated. Python's default for SIGTERM
    ends the process at once, silently, leaving that debris for the next run. Yields a list that
    holds True once SIGTERM arrived; the previous handler is restored after the command."""
    import signal
    import threading

    got: list = []
    if threading.current_thread() is not threading.main_thread():  # signal handlers live in the main thread only
        yield got
        return

    def on_term(signum, frame):
        if got:  # a second SIGTERM while the first one's cleanups run: let them finish
            return
        got.append(True)
        raise KeyboardInterrupt

    before = signal.signal(signal.SIGTERM, on_term)
    try:
        yield got
    finally:
        signal.signal(signal.SIGTERM, before)


_RESUME_HINTS = {
    "train": "the same command with --resume continues, bit for bit, from its last checkpoint where one was "
             "saved (every optim.save_steps steps)",
    "reproduce": "the same command resumes: finished stages are kept",
}
"""What the line of an interrupted command adds, per command: how to go on from where it stopped."""


def _stopped(terminated: list, args: list[str] | None = None) -> int:
    """The line and exit code of an interrupted command: 143 (128 + SIGTERM) or 130 (Ctrl-C)."""
    hint = _RESUME_HINTS.get(next((a for a in args or [] if not a.startswith("-")), ""))
    typer.echo(("terminated" if terminated else "interrupted") + (f"; {hint}" if hint else ""), err=True)
    return 143 if terminated else 130


def _run(args: list[str], t0: float, terminated: list) -> int:
    import time

    import typer._click.exceptions as tx  # typer vendors its own click; its exception types live here

    try:
        twice = _repeated_option(args)
        if twice:
            raise SafetyPatchError(twice)
        rc = app(args=args, prog_name="safety-patch", standalone_mode=False)
        # Without standalone mode click *returns* the code of an abort (Ctrl-C: typer's Abort/Exit
        # become 1 or 130) instead of raising: a command that did not finish must not say "done" and exit 0.
        if isinstance(rc, int) and rc != 0:
            if rc == 130 or terminated:
                return _stopped(terminated, args)
            typer.echo(f"stopped (exit {rc})", err=True)
            return rc
        _summary(args, time.time() - t0)
    except SafetyPatchError as e:
        if _STATE["debug"] or "--debug" in args:
            traceback.print_exc()
        typer.echo(f"safety-patch: error: {e}", err=True)
        return e.exit_code
    except typer.Exit as e:
        return e.exit_code
    except tx.NoArgsIsHelpError as e:
        e.show()
        return 0
    except tx.ClickException as e:
        e.show()
        return e.exit_code
    except (typer.Abort, KeyboardInterrupt):
        return _stopped(terminated, args)
    return 0
