"""pyabouts-reconciler's command line."""

import pytest

from pyabouts.controller.main import parse_args


def test_the_controller_refuses_a_dry_run_rather_than_freeing_in_one(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exited:
        parse_args(["--watch", "--dry-run"])
    assert exited.value.code == 2
    assert "--dry-run is for one pass" in capsys.readouterr().err
    assert parse_args(["--dry-run"]).dry_run  # one pass takes it
    assert not parse_args(["--watch"]).dry_run


@pytest.mark.parametrize("grace", ["-1", "nan", "inf", "soon"])
def test_a_node_lost_grace_that_is_no_length_of_time_is_refused(
    grace: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Negative, it would free the addresses of a healthy node's evicted pods while they run."""
    with pytest.raises(SystemExit) as exited:
        parse_args(["--node-lost-grace", grace])
    assert exited.value.code == 2
    assert "0 or more" in capsys.readouterr().err
    assert parse_args([]).node_lost_grace is None  # by default lost nodes' pods keep theirs
    assert parse_args(["--node-lost-grace", "60"]).node_lost_grace == 60.0
