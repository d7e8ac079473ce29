"""grpc reads GRPC_EXPERIMENTS once, when it is imported, and the etcd store sets it just before
it imports grpc (ipam.stores.etcd): no command of pyabouts may import grpc another way first,
or its etcd calls would go through grpc's EventEngine threads again."""

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"

# Imports each command's module, then the etcd store, and tells what GRPC_EXPERIMENTS said
# when grpc and etcd3 were first looked for.
_PROBE = """
import importlib, json, os, sys

first_looked_for = {}

class Watch:
    def find_spec(self, name, path=None, target=None):
        if name in ("grpc", "etcd3") and name not in first_looked_for:
            first_looked_for[name] = os.environ.get("GRPC_EXPERIMENTS")
        return None

sys.meta_path.insert(0, Watch())
for module in sys.argv[1:]:
    importlib.import_module(module)
by_the_commands = sorted(first_looked_for)
importlib.import_module("pyabouts.ipam.stores.etcd")
print(json.dumps({"by_the_commands": by_the_commands, "setting": first_looked_for}))
"""


def command_modules() -> list[str]:
    """The module of each console script pyabouts installs."""
    scripts = tomllib.loads(PYPROJECT.read_text())["project"]["scripts"]
    return sorted({target.split(":")[0] for target in scripts.values()})


def test_no_command_imports_grpc_before_the_etcd_store_says_how_it_polls() -> None:
    modules = command_modules()
    assert "pyabouts.plugin.agent.server" in modules and "pyabouts.plugin.main" in modules
    env = {k: v for k, v in os.environ.items() if k != "GRPC_EXPERIMENTS"}
    argv = [sys.executable, "-c", _PROBE, *modules]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout.splitlines()[-1])
    assert found["by_the_commands"] == []  # each loads the etcd store on use, and grpc with it
    setting = "-event_engine_client,-event_engine_for_all_other_endpoints"
    assert found["setting"] == {"etcd3": setting, "grpc": setting}
