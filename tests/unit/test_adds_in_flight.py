"""A DEL waits for the agent's ADDs of its attachment that were in flight when it came
(plugin/agent/attachments.py)."""

import threading
import time

from pyabouts.plugin.agent.attachments import AddsInFlight
from tests.waiting import wait_for

LONG = 30.0  # seconds: a deadline no step of these tests comes near


def env(command: str, container: str = "c1", ifname: str = "net1") -> dict[str, str]:
    return {"CNI_COMMAND": command, "CNI_CONTAINERID": container, "CNI_IFNAME": ifname}


class Add:
    """An ADD served on a thread of its own, answered when told to."""

    def __init__(self, adds: AddsInFlight, order: list[str], name: str) -> None:
        self.entered, self.answer = threading.Event(), threading.Event()
        self.thread = threading.Thread(target=self._serve, args=(adds, order, name))
        self.thread.start()
        assert self.entered.wait(LONG)

    def _serve(self, adds: AddsInFlight, order: list[str], name: str) -> None:
        with adds.serving(env("ADD"), time.monotonic() + LONG):
            self.entered.set()
            self.answer.wait(LONG)
            order.append(name)


def test_a_del_is_served_once_the_adds_in_flight_when_it_came_are_answered() -> None:
    adds = AddsInFlight()
    order: list[str] = []
    first, second = Add(adds, order, "add 1"), Add(adds, order, "add 2")  # a retry meanwhile
    with adds.serving(env("DEL", "other"), time.monotonic() + LONG) as servable:
        assert servable  # another attachment's DEL does not wait

    def delete() -> None:
        with adds.serving(env("DEL"), time.monotonic() + LONG) as servable:
            order.append(f"del {servable}")

    deleting = threading.Thread(target=delete)
    deleting.start()
    wait_for(lambda: adds.dels_waiting == 1, LONG, "the DEL waiting", every=0.01)
    later = Add(adds, order, "add 3")  # after the DEL: not waited for
    first.answer.set()
    wait_for(lambda: order == ["add 1"], LONG, "add 1 answered", every=0.01)
    assert deleting.is_alive()  # add 2 is still in flight
    second.answer.set()
    deleting.join(LONG)
    assert order == ["add 1", "add 2", "del True"]
    later.answer.set()
    later.thread.join(LONG)
    for add in (first, second):
        add.thread.join(LONG)


def test_a_del_whose_add_outlasts_its_deadline_is_not_served() -> None:
    adds = AddsInFlight()
    order: list[str] = []
    add = Add(adds, order, "add")
    started = time.monotonic()
    with adds.serving(env("DEL"), started + 0.2) as servable:
        assert not servable
    assert time.monotonic() - started >= 0.2
    with adds.serving(env("CHECK"), started) as servable:
        assert servable  # only DEL waits
    add.answer.set()
    add.thread.join(LONG)
    with adds.serving(env("DEL"), time.monotonic()) as servable:
        assert servable
