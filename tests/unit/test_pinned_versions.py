"""constraints.txt against pyproject.toml and the environment the suite runs in: every
dependency, direct or not, is pinned within the range pyproject.toml allows, nothing else is,
the suite runs with exactly those versions, and both installs use the file (the image's
versions are checked in tests/integration/test_images.py)."""

from __future__ import annotations

import importlib.metadata
from collections.abc import Iterable
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import NormalizedName, canonicalize_name
from packaging.version import Version

from tests.pinned_versions import REPO, declared_requirements, pinned_versions


def installed_closure(requirements: Iterable[Requirement]) -> set[NormalizedName]:
    """The distributions `requirements` need, as the installed ones' metadata says, with the
    extras each is asked for."""
    needed: set[NormalizedName] = set()
    seen: set[tuple[NormalizedName, str]] = set()
    todo = [(req, extra) for req in requirements for extra in ("", *sorted(req.extras))]
    while todo:
        requirement, extra = todo.pop()
        name = canonicalize_name(requirement.name)
        if (name, extra) in seen:
            continue
        seen.add((name, extra))
        needed.add(name)
        for text in importlib.metadata.requires(name) or []:
            dependency = Requirement(text)
            if dependency.marker is None or dependency.marker.evaluate({"extra": extra}):
                todo += [(dependency, e) for e in ("", *sorted(dependency.extras))]
    return needed


def test_every_declared_requirement_is_pinned_within_its_range() -> None:
    pins = pinned_versions()
    for requirement in declared_requirements():
        pinned = pins.get(canonicalize_name(requirement.name))
        assert pinned is not None, f"{requirement.name} is not in constraints.txt"
        assert requirement.specifier.contains(pinned, prereleases=True), (requirement, pinned)


def test_the_pins_are_what_the_declared_requirements_need_and_nothing_else() -> None:
    # A dependency added to pyproject.toml without running pip-compile again fails here, and
    # so does a pin that nothing needs any more.
    assert installed_closure(declared_requirements()) == set(pinned_versions())


def installed_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def test_the_suite_runs_with_the_pinned_versions() -> None:
    installed = {name: installed_version(name) for name in pinned_versions()}
    wrong = {
        name: (pinned, installed[name])
        for name, pinned in pinned_versions().items()
        if installed[name] is None or Version(str(installed[name])) != Version(pinned)
    }
    # setup.sh installs again only when pyproject.toml or constraints.txt is newer than its
    # stamp, not after a `pip install` by hand.
    again = "rm .venv/.pyabouts-installed && bash deploy/local/setup.sh"
    assert wrong == {}, f"(pinned, installed) differ; to install the pinned ones: {again}"


def test_the_virtualenv_and_the_image_are_installed_with_the_constraints() -> None:
    # Right after pip-compile --upgrade the newest releases are the pinned ones: the version
    # checks would not notice an install that dropped the file until PyPI moves on.
    setup = (REPO / "deploy" / "local" / "setup.sh").read_text()
    assert 'local constraints="$repo/constraints.txt"' in setup
    assert '-e "${repo}[dev]" -c "$constraints"' in setup
    containerfile = (REPO / "Containerfile").read_text()
    assert "COPY pyproject.toml constraints.txt ./" in containerfile
    assert "-w /wheels -r requirements.txt -c constraints.txt" in containerfile


def test_a_range_or_a_bare_name_is_refused(tmp_path: Path) -> None:
    constraints = tmp_path / "constraints.txt"
    constraints.write_text("# header\nnetaddr==1.3.0\n    # via pyabouts\n\nPyYAML==6.0.4\n")
    assert pinned_versions(constraints) == {"netaddr": "1.3.0", "pyyaml": "6.0.4"}
    for line in ("pydantic>=2.7", "grpcio", "-e ."):
        constraints.write_text(f"netaddr==1.3.0\n{line}\n")
        with pytest.raises(ValueError, match=r"constraints.txt:2: not name==version"):
            pinned_versions(constraints)
