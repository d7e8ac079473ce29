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
