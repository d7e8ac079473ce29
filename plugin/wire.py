"""The wire format between the node's CNI plugin and pyabouts-agent: four pure functions.

The agent imports them; the thin plugin carries this module's text (pyabouts-install copies it
into the installed file, since that file imports nothing of the package), so it imports nothing
at all and uses only builtins.

One connection to the agent's unix stream socket per CNI call. The plugin sends the request,
then shuts down its write side (SHUT_WR); the agent sends the reply, then closes.

Request, in this order:
  1. the 11 bytes `pyabouts/1\\n` (0x70 0x79 0x61 0x62 0x6f 0x75 0x74 0x73 0x2f 0x31 0x0a);
  2. for each environment variable the call passes (a plugin passes every `CNI_*` one):
     `KEY=VALUE` followed by one NUL byte (0x00). KEY is at least one byte and has no `=` and
     no NUL; VALUE has no NUL. Keys and values are the bytes the kernel gave the plugin; the
     agent decodes them as UTF-8 with surrogate escapes;
  3. one more NUL byte: an empty entry ends the environment;
  4. the network configuration exactly as the runtime wrote it on the plugin's stdin (any
     bytes, possibly none), up to the end of the stream.
  Among the entries a plugin also passes `PYABOUTS_DEADLINE=` (DEADLINE_KEY) with the time it
  stops waiting for the reply, in Unix milliseconds: the agent starts no command after that
  time less a margin, and ends its command's retries by then (a request that waited in the
  socket's backlog while the agent was stalled would else be carried out after the plugin had
  answered code 11, and the runtime had moved on).
  The agent answers a request over 1 MiB, or one that has not arrived whole within its
  --request-deadline (10 s), with a CNI error.

Reply, in this order:
  1. the exit code the plugin must exit with, 0 to 255, in ASCII decimal digits;
  2. one NUL byte;
  3. the bytes the plugin must print on stdout (CNI result or CNI error JSON, or nothing), up
     to the end of the stream.
  A reply that ends before its NUL, or whose exit code is not such digits, means the agent died
  mid-request: the plugin prints a CNI error with code 11 (try again later) and exits 1, and
  never guesses at the outcome.
"""

MAGIC = b"pyabouts/1\n"
DEADLINE_KEY = "PYABOUTS_DEADLINE"
MAX_EXIT_CODE = 255  # what a process can exit with
# Beside the socket: the agent's journal of address changes answered and not stored yet (see
# ipam.stores.write_behind). A plugin that finds no agent must not serve in-process while it
# holds any: it could give one of those addresses again.
PENDING_JOURNAL = "pending-writes.journal"
# Beside it: locked (flock) by the agent for its whole life, and shared by plugins serving
# in-process while they do, so that none serves beside an agent starting or stopping.
JOURNAL_LOCK = "pending-writes.lock"


class WireError(ValueError):
    """Bytes that are not a well-formed request or reply."""


def encode_request(environ: "list[tuple[bytes, bytes]]", config: bytes) -> bytes:
    """The request carrying `environ` (key, value pairs) and `config` (the plugin's stdin)."""
    for key, value in environ:
        if not key or b"=" in key or b"\0" in key or b"\0" in value:
            raise WireError(f"environment entry {key[:40]!r} cannot be framed")
    entries = [key + b"=" + value + b"\0" for key, value in environ]
    return b"".join([MAGIC, *entries, b"\0", config])


def decode_request(data: bytes) -> "tuple[dict[str, str], bytes]":
    """The environment and configuration of a request."""
    if not data.startswith(MAGIC):
        raise WireError("not a pyabouts request")
    body = data[len(MAGIC) :]
    env: dict[str, str] = {}
    while True:
        entry, nul, body = body.partition(b"\0")
        if not nul:
            raise WireError("request ended inside its environment")
        if not entry:
            return env, body
        key, equals, value = entry.partition(b"=")
        if not equals or not key:
            raise WireError(f"environment entry without a KEY=: {entry[:40]!r}")
        env[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")


def encode_reply(exit_code: int, stdout: bytes) -> bytes:
    """The reply telling the plugin to print `stdout` and exit with `exit_code`."""
    if not 0 <= exit_code <= MAX_EXIT_CODE:
        raise WireError(f"exit code {exit_code} cannot be framed")
    return b"%d\0" % exit_code + stdout


def decode_reply(data: bytes) -> "tuple[int, bytes]":
    """The exit code and stdout of a reply; WireError if the agent ended before answering."""
    code, nul, stdout = data.partition(b"\0")
    if not nul or not code.isdigit():
        raise WireError("the reply ended before its exit code")
    value = code.lstrip(b"0") or b"0"  # never int() of thousands of digits: it refuses them
    if len(value) > 3 or int(value) > MAX_EXIT_CODE:
        raise WireError(f"exit code {code[:12]!r} is out of range")
    return int(value), stdout
