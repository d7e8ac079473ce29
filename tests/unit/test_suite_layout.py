"""How the suite itself is put together: tests import helpers, never other tests, and the unit
tests and the shared fixtures load without container tooling (the fixtures' servers are host
processes)."""

import ast
import json
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
REPOSITORY = TESTS.parent


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


def test_no_module_of_the_suite_or_the_benchmark_imports_a_test_module() -> None:
    offenders = {
        f"{path.relative_to(REPOSITORY)} imports {module}"
        for path in [*TESTS.rglob("*.py"), *(REPOSITORY / "bench").rglob("*.py")]
        for module in imported_modules(path)
        if module.startswith("tests.") and module.rsplit(".", 1)[-1].startswith("test_")
    }
    assert offenders == set()


LOAD_THE_UNIT_SUITE = """
import importlib, json, pathlib, sys
import tests.conftest
for plugin in tests.conftest.pytest_plugins:
    importlib.import_module(plugin)
for path in sorted(pathlib.Path("tests/unit").glob("*.py")):
    importlib.import_module("tests.unit." + path.stem)
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in ("testcontainers", "docker"))))
"""


def test_the_unit_suite_and_the_shared_fixtures_load_without_testcontainers() -> None:
    done = subprocess.run(
        [sys.executable, "-c", LOAD_THE_UNIT_SUITE],
        cwd=REPOSITORY,
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(done.stdout) == []


GROUPED_MODULE = """
import os
import pytest

pytestmark = pytest.mark.xdist_group("processes")


@pytest.mark.parametrize("n", range(3))
def test_record_the_worker(n: int) -> None:
    with open("workers", "a") as workers:
        workers.write(os.environ["PYTEST_XDIST_WORKER"] + "\\n")
"""


def test_the_processes_group_runs_on_one_worker(tmp_path: Path) -> None:
    """The heavy tests are kept apart by tests/run.sh's --dist loadgroup; if a pytest or
    pytest-xdist upgrade loses the grouping, they starve each other on two cores."""
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    for name in ("test_first.py", "test_second.py"):
        (tmp_path / name).write_text(GROUPED_MODULE)
    subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-n", "2", "--dist", "loadgroup"],
        cwd=tmp_path,
        capture_output=True,
        check=True,
    )
    workers = (tmp_path / "workers").read_text().split()
    assert len(workers) == 6
    assert len(set(workers)) == 1, workers
