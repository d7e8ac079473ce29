"""The `pyabouts` CNI executable: read the request, serve it, print the reply."""

from __future__ import annotations

import os
import sys


def main() -> None:
    from pyabouts.plugin.handler import handle_request  # noqa: PLC0415 - keep interpreter start minimal

    reply = handle_request(os.environ, sys.stdin.buffer.read())
    sys.stdout.buffer.write(reply.stdout)
    sys.stdout.buffer.flush()
    sys.exit(reply.exit_code)


if __name__ == "__main__":
    main()
