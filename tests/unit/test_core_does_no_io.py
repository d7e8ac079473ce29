"""`ipam` decides; the edges read and write. Importing every module of it, store adapters
included, makes its own code open no file, create no socket and start no process (checked in a
fresh interpreter with an audit hook, so that nothing was imported before). What libraries do
when they are imported (urllib3 probes for IPv6 with a socket, pydantic looks for plugins in
installed distributions' metadata) is theirs, and told apart by the code that asked."""

import json
import subprocess
import sys
from pathlib import Path

from pyabouts import ipam

CHECK = """
import importlib, json, pkgutil, sys
CORE = sys.argv[1]
events = []
def asker():
    frame = sys._getframe(2)  # the code that caused the event, past this hook
    while frame is not None and frame.f_code.co_filename.startswith("<frozen"):
        frame = frame.f_back  # the import system, on behalf of whoever imported
    return frame.f_code.co_filename if frame is not None else ""
def hook(event, args):
    module = event == "open" and str(args[0]).endswith((".py", ".pyc", ".so"))  # an import
    io = event == "open" or event.startswith(("socket.", "subprocess.", "os.exec", "os.system"))
    io = io and not module
    if io and asker().startswith(CORE):
        events.append([event, repr(args)[:100], asker()])
sys.addaudithook(hook)
from pyabouts import ipam
modules = [m.name for m in pkgutil.walk_packages(ipam.__path__, "pyabouts.ipam.")]
for name in modules:
    importlib.import_module(name)
print(json.dumps({"modules": modules, "events": events}))
"""


def test_importing_the_core_and_its_stores_does_no_io_of_its_own() -> None:
    core = str(Path(ipam.__file__).parent) + "/"
    done = subprocess.run(
        [sys.executable, "-c", CHECK, core], capture_output=True, text=True, check=True
    )
    found = json.loads(done.stdout)
    expected = {"pyabouts.ipam.allocator", "pyabouts.ipam.config", "pyabouts.ipam.stores.etcd"}
    assert expected <= set(found["modules"])
    assert found["events"] == []
