"""pyabouts-agent refuses a socket it cannot serve on with one line, not a traceback."""

from pathlib import Path

import pytest

from pyabouts.plugin.agent.server import main
from pyabouts.serving.listen import UNIX_PATH_MAX


def test_a_socket_path_too_long_for_a_unix_socket_is_refused_as_an_argument(
    capsys: pytest.CaptureFixture[str],
) -> None:
    too_long = "/run/" + "x" * (UNIX_PATH_MAX - len("/run/"))
    with pytest.raises(SystemExit) as exited:
        main(["--socket", too_long, "--trust-request-datastore"])
    assert exited.value.code == 2  # argparse's usage error: nothing was started
    error = capsys.readouterr().err
    assert f"{UNIX_PATH_MAX} bytes long" in error
    assert f"fewer than {UNIX_PATH_MAX}" in error


@pytest.mark.parametrize("path", ["agent.sock", "@pyabouts"])
def test_a_socket_path_that_is_not_absolute_is_refused_as_an_argument(
    capsys: pytest.CaptureFixture[str], path: str
) -> None:
    # The plugins the runtime starts in other directories would not meet it; to the Go shim,
    # "@pyabouts" is an abstract socket that any process of the host's network may bind.
    with pytest.raises(SystemExit) as exited:
        main(["--socket", path, "--trust-request-datastore"])
    assert exited.value.code == 2
    assert f"the unix socket {path!r} is not an absolute path" in capsys.readouterr().err


def test_a_socket_whose_directory_cannot_be_made_is_refused_with_the_reason(
    tmp_path: Path,
) -> None:
    not_a_directory = tmp_path / "file"
    not_a_directory.write_text("")
    socket = not_a_directory / "agent.sock"
    with pytest.raises(SystemExit) as exited:
        main(["--socket", str(socket), "--trust-request-datastore", "--listen", "127.0.0.1:0"])
    assert str(exited.value.code).startswith(f"pyabouts-agent: cannot serve on {socket}: ")
    assert "File exists" in str(exited.value.code)  # the file where its directory would be
    assert not socket.exists()
