"""pyproject.toml's package list: the repo's package roots install as pyabouts.*."""

import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
ROOTS = ("ipam", "plugin", "controller", "serving")


def test_every_package_directory_is_listed_under_pyabouts() -> None:
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert setuptools["package-dir"] == {f"pyabouts.{root}": root for root in ROOTS}
    found = {
        ".".join(("pyabouts", *init.parent.relative_to(REPO).parts))
        for root in ROOTS
        for init in (REPO / root).rglob("__init__.py")
    }
    assert sorted(setuptools["packages"]) == sorted(found)


def test_pyabouts_links_each_package_root() -> None:
    # pyabouts/<root> -> ../<root>: the development install imports pyabouts.* through them.
    for root in ROOTS:
        link = REPO / "pyabouts" / root
        assert link.is_symlink() and link.resolve() == REPO / root, link
    assert sorted(path.name for path in (REPO / "pyabouts").iterdir()) == sorted(ROOTS)
