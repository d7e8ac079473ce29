"""The images built here: the project's (``Containerfile``, on the debootstrap base) and the
busybox test image.

The project image's entry points answer, its virtualenv holds the package and not the build's
tools, and its dependencies at the versions constraints.txt pins, the node plugin answers
VERSION, and a second build with the same inputs is a cache hit (no ``podman build``, the same
image). The first build of a fresh machine takes a few minutes (debootstrap, then the wheels);
later ones find the image by its inputs' label.
"""

from __future__ import annotations

import json
import re
import subprocess
import tarfile
import time
import tomllib
from pathlib import Path
from typing import Any

import pytest
from packaging.utils import canonicalize_name

from deploy.local.container_images import TEST_IMAGE, busybox_archive
from deploy.local.project_image import (
    REPO_ROOT,
    BuiltImage,
    debian_base,
    project_image,
    project_version,
)
from pyabouts.plugin.cni import render_version
from tests.pinned_versions import declared_requirements, pinned_versions

CONTAINERFILE = REPO_ROOT / "Containerfile"
SHIM_IN_IMAGE = "/opt/pyabouts/libexec/pyabouts-shim"

pytestmark = [
    pytest.mark.integration,
    pytest.mark.xdist_group("processes"),
    pytest.mark.timeout(1800),
]

LIST_THE_VENV = """
import importlib, importlib.metadata, json, pathlib, pkgutil, shutil, sys, sysconfig
import pyabouts
site = pathlib.Path(sysconfig.get_paths()["purelib"])
modules = [m.name for m in pkgutil.walk_packages(pyabouts.__path__, "pyabouts.")]
for name in modules:
    importlib.import_module(name)  # all that the image leaves out (kubernetes.aio) is unused
print(json.dumps({
    "modules": len(modules),
    "prefix": sys.prefix,
    "top": sorted(p.name for p in site.iterdir() if p.is_dir() and "." not in p.name),
    "tools": [t for t in ("pip", "gcc", "cc") if shutil.which(t)],
    "distributions": {d.metadata["Name"]: d.version for d in importlib.metadata.distributions()},
}))
"""


@pytest.fixture(scope="module")
def image() -> BuiltImage:
    t0 = time.monotonic()
    built = project_image()
    print(f"project image {'found' if built.cached else 'built'} in {time.monotonic() - t0:.1f} s")
    return built


def podman_run(
    image: str, *argv: str, env: dict[str, str] | None = None, stdin: str = "", cap: str = ""
) -> subprocess.CompletedProcess[str]:
    flags = [f"--env={key}={value}" for key, value in (env or {}).items()]
    # podman leaves NET_RAW out by default; containerd, which runs the pods, grants it.
    flags += [f"--cap-add={cap}"] if cap else []
    return subprocess.run(
        ["podman", "run", "--rm", "-i", "--network=none", *flags, image, *argv],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_the_project_image_is_tagged_with_the_package_version(image: BuiltImage) -> None:
    assert image.name == f"localhost/pyabouts:{project_version()}"


def console_scripts() -> list[str]:
    """The package's commands but the node plugin (which speaks CNI, not --help)."""
    with (REPO_ROOT / "pyproject.toml").open("rb") as f:
        scripts = tomllib.load(f)["project"]["scripts"]
    return sorted(name for name in scripts if name != "pyabouts")


@pytest.mark.parametrize("command", console_scripts())
def test_every_entry_point_answers(image: BuiltImage, command: str) -> None:
    done = podman_run(image.name, command, "--help")
    assert done.returncode == 0, done.stderr
    assert "usage:" in done.stdout


def test_the_node_plugin_answers_version(image: BuiltImage) -> None:
    done = podman_run(image.name, "pyabouts", env={"CNI_COMMAND": "VERSION"}, stdin="{}")
    assert done.returncode == 0, done.stderr
    reply = json.loads(done.stdout)
    assert "1.1.0" in reply["supportedVersions"]
    assert reply["cniVersion"]


def test_the_installer_puts_the_images_static_shim_on_the_node(image: BuiltImage) -> None:
    script = (
        "pyabouts-install --shim=/opt/pyabouts/libexec/pyabouts-shim --cni-bin-dir=/tmp/bin"
        " && CNI_COMMAND=VERSION /tmp/bin/pyabouts && echo"
        " && CNI_COMMAND=ADD /tmp/bin/pyabouts"
    )
    done = podman_run(image.name, "sh", "-c", script, stdin='{"cniVersion": "0.4.0"}')
    installed, version, no_agent = done.stdout.splitlines()
    assert installed.startswith("installed /tmp/bin/pyabouts")
    assert json.loads(version) == render_version()
    error = json.loads(no_agent)  # no agent in this container: try again later
    assert done.returncode == 1 and error["code"] == 11 and error["cniVersion"] == "0.4.0"
    assert (
        error["msg"] == "no pyabouts agent at /run/pyabouts/agent.sock: no such file or directory"
    )


def test_the_images_shim_is_built_by_the_pinned_go_toolchain(
    image: BuiltImage, tmp_path: Path
) -> None:
    """Not by Debian 12's Go 1.19, long out of support, whose standard library the shim would
    carry onto every node."""
    pinned = re.search(r"^ARG GO_TOOLCHAIN=(go[0-9.]+)$", CONTAINERFILE.read_text(), re.M)
    assert pinned is not None
    shim = tmp_path / "pyabouts-shim"
    shim.write_bytes(
        subprocess.run(
            ["podman", "run", "--rm", "--network=none", image.name, "cat", SHIM_IN_IMAGE],
            capture_output=True,
            timeout=120,
            check=True,
        ).stdout
    )
    which = [str(REPO_ROOT / "plugin/shim/build.sh"), "--which-go"]
    go = subprocess.run(["sh", *which], capture_output=True, text=True, check=True).stdout
    built_by = subprocess.run(
        [go.strip(), "version", str(shim)], capture_output=True, text=True, check=True
    )
    assert built_by.stdout.split() == [f"{shim}:", pinned.group(1)]


@pytest.fixture(scope="module")
def venv(image: BuiltImage) -> dict[str, Any]:
    """What LIST_THE_VENV finds in the image's virtualenv."""
    done = podman_run(image.name, "python", "-c", LIST_THE_VENV)
    assert done.returncode == 0, done.stderr
    listed: dict[str, Any] = json.loads(done.stdout)
    return listed


def test_the_virtualenv_holds_the_package_whole_and_no_build_tools(venv: dict[str, Any]) -> None:
    assert venv["prefix"] == "/opt/pyabouts"
    assert venv["modules"] > 30
    assert "pyabouts" in venv["top"]
    assert not {"pip", "setuptools", "ipam", "plugin", "controller"} & set(venv["top"])
    assert venv["tools"] == []


def test_the_images_dependencies_are_the_versions_the_suite_runs_with(
    venv: dict[str, Any],
) -> None:
    pins = pinned_versions()
    installed = {canonicalize_name(n): v for n, v in venv["distributions"].items()}
    assert installed.pop(canonicalize_name("pyabouts")) == project_version()
    assert installed == {name: pins.get(name) for name in installed}
    assert {canonicalize_name(r.name) for r in declared_requirements(extras=())} <= set(installed)


def test_a_second_build_with_the_same_inputs_is_a_cache_hit(image: BuiltImage) -> None:
    t0 = time.monotonic()
    again = project_image()
    assert again.cached
    assert again.image_id == image.image_id
    assert debian_base().cached
    assert time.monotonic() - t0 < 10


def test_the_test_image_runs_busybox_applets() -> None:
    archive = busybox_archive()
    assert busybox_archive() == archive  # cached by its input
    with tarfile.open(archive) as outer:
        assert "manifest.json" in outer.getnames()
    subprocess.run(["podman", "load", "-q", "-i", str(archive)], check=True, timeout=120)
    script = "nc --help 2>&1 | head -1; ping -c1 127.0.0.1"
    done = podman_run(TEST_IMAGE, "sh", "-c", script, cap="NET_RAW")
    assert done.returncode == 0, done.stderr
    assert "BusyBox" in done.stdout
    assert "1 packets received" in done.stdout
