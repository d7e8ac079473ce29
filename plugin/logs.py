"""`log_file` and `log_level` (whereabouts' levels: debug, verbose, error, panic)."""

from __future__ import annotations

import logging
import os
import stat
import sys
from io import TextIOWrapper
from typing import cast

LEVELS = {
    "debug": logging.DEBUG,
    "verbose": logging.INFO,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "panic": logging.CRITICAL,
}
DEFAULT_LEVEL = "error"
_configured: tuple[str | None, str] | None = None


def configure_logging(log_file: str | None, log_level: str | None) -> None:
    """Send pyabouts' logs to `log_file` (stderr when unset) at `log_level`.

    Idempotent, so a long-lived server that serves many requests configures it once.
    """
    global _configured  # noqa: PLW0603 - logging is process-wide state by nature
    wanted = (log_file, log_level or DEFAULT_LEVEL)
    if _configured == wanted:
        return
    handler: logging.Handler
    try:
        handler = _LogFile(log_file) if log_file else logging.StreamHandler(sys.stderr)
    except OSError:
        # An unwritable log file must not fail the ADD; stderr reaches the runtime's logs.
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s")
    )
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(LEVELS[wanted[1]])
    _configured = wanted


class _LogFile(logging.FileHandler):
    """A log file opened as a process running as root may open one: never through a link,
    never a file with a second name (a hard link to a script), never a pipe (which would block
    the call)."""

    def _open(self) -> TextIOWrapper:
        opened = open(  # noqa: SIM115 - the handler keeps it, and closes it
            self.baseFilename,
            self.mode,
            encoding=self.encoding,
            errors=self.errors,
            opener=_open_own_file,
        )
        return cast(TextIOWrapper, opened)  # text mode ("a"): a TextIOWrapper


def _open_own_file(path: str, flags: int) -> int:
    descriptor = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o644)
    status = os.fstat(descriptor)
    if not stat.S_ISREG(status.st_mode) or status.st_nlink != 1:
        os.close(descriptor)
        raise OSError(f"{path} is not a file of its own")
    return descriptor
