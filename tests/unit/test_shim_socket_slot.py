"""pyabouts-install writes the agent's socket path into the shim's slot (plugin/shim/main.go,
socketSlot); tests/integration/test_shim.py runs a shim so written."""

from pathlib import Path

import pytest

from pyabouts.plugin.install import SHIM_SLOT_MARKER, SHIM_SLOT_SIZE, main, shim_with_socket
from pyabouts.serving.listen import UNIX_PATH_MAX

BINARY = b"\x7fELF code " + SHIM_SLOT_MARKER + b"\0" * SHIM_SLOT_SIZE + b"\x01rest of rodata"


def test_the_path_fills_the_slot_padded_and_nothing_else_changes() -> None:
    written = shim_with_socket(BINARY, "/run/x/agent.sock")
    assert len(written) == len(BINARY)
    start = BINARY.index(SHIM_SLOT_MARKER) + len(SHIM_SLOT_MARKER)
    assert written[:start] == BINARY[:start]
    assert written[start : start + SHIM_SLOT_SIZE].rstrip(b"\0") == b"/run/x/agent.sock"
    assert written[start + SHIM_SLOT_SIZE :] == b"\x01rest of rodata"


def test_a_written_slot_is_written_again_whole() -> None:
    once = shim_with_socket(BINARY, "/a/much/longer/path/to/the/agent.sock")
    assert shim_with_socket(once, "/b.sock") == shim_with_socket(BINARY, "/b.sock")


@pytest.mark.parametrize("path", ["", "/a\0b", "/" + "x" * SHIM_SLOT_SIZE])
def test_a_path_that_does_not_fit_is_refused(path: str) -> None:
    with pytest.raises(ValueError, match="does not fit"):
        shim_with_socket(BINARY, path)


def test_a_path_no_unix_socket_can_have_is_refused() -> None:
    """It fits the slot, but connect() would refuse it on every call (code 11 for ever)."""
    longest = "/" + "x" * (UNIX_PATH_MAX - 2)
    shim_with_socket(BINARY, longest)
    with pytest.raises(ValueError, match="fewer than 108"):
        shim_with_socket(BINARY, longest + "x")


@pytest.mark.parametrize("path", ["run/pyabouts/agent.sock", "@pyabouts"])
def test_a_path_the_agent_and_the_shim_would_read_differently_is_refused(path: str) -> None:
    with pytest.raises(ValueError, match="not an absolute path"):
        shim_with_socket(BINARY, path)


@pytest.mark.parametrize(
    "binary",
    [
        b"#!/usr/bin/python3 -IS\n",  # not the shim
        BINARY + SHIM_SLOT_MARKER + b"\0" * SHIM_SLOT_SIZE,  # two slots: which one?
        BINARY[: BINARY.index(SHIM_SLOT_MARKER) + 100],  # a truncated file
    ],
)
def test_a_file_without_exactly_one_whole_slot_is_refused(binary: bytes) -> None:
    with pytest.raises(ValueError, match="not a pyabouts shim"):
        shim_with_socket(binary, "/run/pyabouts/agent.sock")


def test_the_installer_refuses_such_a_path_for_the_thin_plugin_too(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["--cni-bin-dir", str(tmp_path), "--agent-socket", "@pyabouts"])
    assert exited.value.code == 2  # argparse's usage error: nothing was written
    assert "not an absolute path" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
