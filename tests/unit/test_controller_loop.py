"""The controller's loop while its passes fail: it waits for the resync, whatever it has left
to judge again (tests/integration/test_reconciler_controller.py runs it on the apiserver)."""

import threading
import time
import types
from typing import Any

from pyabouts.controller.controller import Controller
from pyabouts.controller.leaks import Policy
from pyabouts.controller.pods import PodListing
from pyabouts.controller.watching import Relisted
from pyabouts.ipam.errors import StoreUnavailableError


class DownStore:
    def __init__(self) -> None:
        self.reads = 0

    def read_all_blocks(self, *, on_unreadable: Any = None) -> list[Any]:
        self.reads += 1
        raise StoreUnavailableError("the datastore is down")


def test_failing_passes_wait_for_the_resync_though_a_leak_is_due_to_be_judged_again() -> None:
    store = DownStore()
    connections: Any = types.SimpleNamespace(store=store, api_client=None)
    controller = Controller(connections, Policy(), resync=300, gone_grace=1.0)
    listing = Relisted(PodListing({}, "1"))
    controller._watch = types.SimpleNamespace(events=lambda stop: iter([listing]))  # type: ignore[assignment]
    # A pass left a leak to judge again, and its grace has passed: the next full pass is due.
    controller._found_at = {"ns/gone": time.time() - 1.5}
    loop = threading.Thread(target=controller.run, daemon=True)
    loop.start()
    time.sleep(1.5)
    controller.stop.set()
    loop.join(10)
    assert store.reads == 1  # the listing's pass; it spun at 10 a second
