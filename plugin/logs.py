"""`log_file` and `log_level` (whereabouts' levels: debug, verbose, error, panic)."""

from __future__ import annotations

import logging
import sys

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
        handler = logging.FileHandler(log_file) if log_file else logging.StreamHandler(sys.stderr)
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
