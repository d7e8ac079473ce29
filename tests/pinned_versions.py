"""constraints.txt, the version of every distribution the package and its dev tools need to
run, pinned; and pyproject.toml's requirements, which it pins.

pip-compile writes it from pyproject.toml (the command is in its header); setup.sh installs the
test virtualenv with it and the Containerfile builds the image's wheels with it, so that the
image ships what the suite ran with, and a release on PyPI changes neither until the file does.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import NormalizedName, canonicalize_name

REPO = Path(__file__).resolve().parents[1]
CONSTRAINTS = REPO / "constraints.txt"
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)\s*$")


def pinned_versions(path: Path = CONSTRAINTS) -> dict[NormalizedName, str]:
    """Each distribution the file pins, by its canonical name, and its version. ValueError on a
    requirement line that is not `name==version` (a range would pin nothing)."""
    pins: dict[NormalizedName, str] = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        match = _PIN.match(text)
        if match is None:
            raise ValueError(f"{path.name}:{number}: not name==version: {text!r}")
        pins[canonicalize_name(match.group(1))] = match.group(2)
    return pins


def declared_requirements(extras: tuple[str, ...] = ("dev",)) -> list[Requirement]:
    """pyproject.toml's dependencies, and those of `extras`, that apply to this Python (a
    marker can rule one out, as pip-compile then does)."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    texts = [*project["dependencies"]]
    for extra in extras:
        texts += project["optional-dependencies"][extra]
    requirements = [Requirement(text) for text in texts]
    return [r for r in requirements if r.marker is None or r.marker.evaluate({"extra": ""})]
