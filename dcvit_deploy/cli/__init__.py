"""``dcvit-deploy`` command line: parse options, call :mod:`dcvit_deploy.api`, print.

Commands by module: :mod:`.run` (compress, family, demo, demo-data), :mod:`.stages` (export,
build, profile, select, triton, report), :mod:`.info` (status, doctor, profiles, compare);
:mod:`.options` declares every option, :mod:`.console` prints. Heavy imports (torch, timm,
onnxruntime) happen inside command bodies so ``--help`` is instant. User errors print one line
(problem; fix) to stderr and exit 1 (3: no candidate meets the budget, 4: regression against a
baseline, 5: chosen but not published to Triton); Ctrl-C leaves a resumable run and exits 130.
"""

from __future__ import annotations

import _signal  # the builtin behind `signal`: installing a handler imports nothing
import os
import sys

INTERRUPTED = "interrupted: rerun the same command to resume"


def _interrupted_while_importing(signum: int, frame: FrameType | None) -> None:
    """Ctrl-C while the CLI still imports (the first tenth of a second of the console script):
    no traceback, the same line and exit code as later."""
    sys.stderr.write(f"{INTERRUPTED}\n")
    sys.stderr.flush()
    os._exit(130)


# Installed before anything slow is imported, restored at the end of this module.
try:
    _SIGINT_BEFORE_IMPORT: Any = _signal.signal(_signal.SIGINT, _interrupted_while_importing)
except ValueError:  # imported outside the main thread: signals are not ours to handle
    _SIGINT_BEFORE_IMPORT = None

import errno  # noqa: E402
import signal  # noqa: E402
from types import FrameType  # noqa: E402
from typing import Any  # noqa: E402

import click  # noqa: E402

from dcvit_deploy.errors import DcvitError  # noqa: E402


@click.group(
    context_settings={
        "help_option_names": ["-h", "--help"],
        "max_content_width": 110,
        "show_default": True,
    }
)
@click.version_option(package_name="dcvit-deploy")
def cli() -> None:
    """Compress a ViT with DC-ViT into a dense family, deploy it, and pick the densest
    candidate that meets a measured latency budget.

    Exit codes: 0 ok; 1 user or environment error; 3 no candidate meets the budget; 4 a
    regression in `compare`; 5 a candidate was chosen but not published to Triton; 130
    interrupted."""


# The commands register on `cli` as their modules are imported.
from dcvit_deploy.cli import info, run, stages  # noqa: E402, F401
from dcvit_deploy.cli.console import close_progress  # noqa: E402

ENVIRONMENT_ERRNOS = frozenset(
    getattr(errno, name)
    for name in ("EACCES", "EPERM", "EROFS", "ENOSPC", "EDQUOT", "ENOTDIR", "EISDIR",
                 "ENAMETOOLONG", "EMFILE", "ENFILE", "EFBIG", "ELOOP", "EXDEV")
    if hasattr(errno, name)
)  # fmt: skip
"""OSErrors a user or their machine causes (permissions, read-only or full disks, bad paths):
printed as one line. Any other OSError is a bug here and keeps its traceback."""


def _caused_by_interrupt(exc: BaseException) -> bool:
    """True when ``exc`` is, or was raised while handling, a Ctrl-C (e.g. an ImportError left
    behind by an interrupted ``import torch``)."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, (KeyboardInterrupt, click.exceptions.Abort)):
            return True
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    return False


def _on_sigint(handler: Any) -> Any:
    """Install ``handler`` for Ctrl-C; the previous one, or ``None`` off the main thread (where
    signals are not ours to handle)."""
    try:
        return signal.signal(signal.SIGINT, handler)
    except ValueError:
        return None


def _fail(message: str, code: int) -> None:
    """Print ``message`` as the one line on stderr and exit with ``code`` (a second Ctrl-C
    while printing is ignored, so the line and the code are always what the user gets)."""
    previous = _on_sigint(signal.SIG_IGN)
    try:
        click.echo(" ".join(message.split()), err=True)
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
    sys.exit(code)


def main(argv: list[str] | None = None) -> None:
    """Console entry point: the exit codes of ``dcvit-deploy --help``; user, environment and
    usage errors are one line (problem; fix); anything else is a bug and keeps its traceback."""
    interrupts: list[int] = []

    def on_sigint(signum: int, frame: FrameType | None) -> None:
        # Remember the Ctrl-C: a C extension interrupted while it imports (numpy under torch)
        # can swallow the KeyboardInterrupt and fail with an unrelated ImportError instead.
        interrupts.append(signum)
        raise KeyboardInterrupt

    previous = _on_sigint(on_sigint)
    try:
        try:
            cli.main(args=argv, prog_name="dcvit-deploy", standalone_mode=False)
        finally:
            close_progress()
    except DcvitError as exc:
        _fail(f"error: {exc.one_line()}", exc.exit_code)
    except click.exceptions.NoArgsIsHelpError as exc:
        click.echo(exc.ctx.get_help() if exc.ctx else str(exc))
        sys.exit(0)
    except click.UsageError as exc:
        command = exc.ctx.command_path if exc.ctx else "dcvit-deploy"
        _fail(f"error: {exc.format_message().rstrip('.')}; fix: see `{command} --help`", 1)
    except click.ClickException as exc:
        _fail(f"error: {exc.format_message().rstrip('.')}", 1)
    except OSError as exc:
        if exc.errno not in ENVIRONMENT_ERRNOS:
            if interrupts or _caused_by_interrupt(exc):
                _fail(INTERRUPTED, 130)
            raise
        where = f": {exc.filename}" if exc.filename else ""
        _fail(
            f"error: {exc.strerror or exc}{where}; fix: check that the path exists, is "
            "writable and that its file system has free space",
            1,
        )
    except (KeyboardInterrupt, Exception) as exc:
        if interrupts or _caused_by_interrupt(exc):
            _fail(INTERRUPTED, 130)
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


if _SIGINT_BEFORE_IMPORT is not None:  # the import is over: Ctrl-C is main()'s to handle
    signal.signal(signal.SIGINT, _SIGINT_BEFORE_IMPORT)
