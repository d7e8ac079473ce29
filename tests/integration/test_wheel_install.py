"""The package as users install it: the built wheel, in a virtualenv of its own.

The wheel's only top-level name is `pyabouts` (no `ipam`, `plugin` or `controller` beside other
packages in site-packages), and the thin plugin installed from it still finds the package for
its in-process fallback, although it runs with `python3 -IS` (no site, so no `.pth` hooks). The
editable install's case is tests/unit/test_thin_client.py's.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

REPOSITORY = Path(__file__).resolve().parents[2]
PIP = ("-m", "pip", "--disable-pip-version-check", "-q")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Built from a copy: setuptools leaves build/ behind, and reuses what an old build left.
    source = tmp_path_factory.mktemp("source") / "pyabouts"
    skip = shutil.ignore_patterns(".git", ".venv", "build", "*.egg-info", "__pycache__", ".*cache")
    shutil.copytree(REPOSITORY, source, symlinks=True, ignore=skip)
    out = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [sys.executable, *PIP, "wheel", "--no-deps", "-w", str(out), str(source)],
        check=True,
        timeout=600,
    )
    [built] = out.glob("pyabouts-*.whl")
    return built


@pytest.fixture(scope="module")
def venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtualenv (no system site-packages) with the wheel and its dependencies."""
    root = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", str(root)], check=True, timeout=120)
    python = root / "bin" / "python"
    subprocess.run([str(python), *PIP, "install", str(wheel)], check=True, timeout=600)
    return root


def test_the_wheel_installs_one_top_level_package_pyabouts(wheel: Path, venv: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        tops = {name.split("/")[0] for name in archive.namelist()}
    assert {top for top in tops if not top.endswith(".dist-info")} == {"pyabouts"}
    # Installed, the subpackages import under pyabouts only; the repository is not on the path.
    probe = (
        "import importlib.util, json, pyabouts.plugin.handler as h;"
        "print(json.dumps([h.__file__] + [n for n in ('ipam', 'plugin', 'controller', 'serving')"
        " if importlib.util.find_spec(n) is not None]))"
    )
    done = subprocess.run(
        [str(venv / "bin" / "python"), "-I", "-c", probe],
        capture_output=True,
        text=True,
        check=True,
        cwd="/",
        timeout=60,
    )
    handler_file, *stray_tops = json.loads(done.stdout)
    assert handler_file.startswith(str(venv)), handler_file
    assert stray_tops == []


def test_the_thin_plugin_installed_from_the_wheel_falls_back_to_the_package(
    venv: Path, tmp_path: Path
) -> None:
    bin_dir = tmp_path / "cni-bin"
    subprocess.run(
        [
            str(venv / "bin" / "pyabouts-install"),
            *("--cni-bin-dir", str(bin_dir)),
            *("--agent-socket", str(tmp_path / "no-agent.sock")),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    plugin = bin_dir / "pyabouts"
    first_line, text = plugin.read_text().split("\n", 1)[0], plugin.read_text()
    assert first_line.endswith(" -IS")
    assert str(REPOSITORY) not in text  # the fallback's paths are the virtualenv's
    # No agent answers: the plugin serves in-process. An invalid config then gets pyabouts'
    # own answer (code 7), which only the package can give; without it the answer is code 11.
    conf = {"cniVersion": "1.0.0", "name": "n", "ipam": {"type": "pyabouts"}}
    env = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c1", "CNI_IFNAME": "net1"}
    done = subprocess.run(
        [str(plugin)],
        input=json.dumps(conf).encode(),
        env=env,
        capture_output=True,
        cwd="/",
        timeout=60,
        check=False,
    )
    reply = json.loads(done.stdout)
    assert (done.returncode, reply["code"]) == (1, 7), reply
