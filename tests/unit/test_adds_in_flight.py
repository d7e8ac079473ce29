"""A DEL waits for the agent's ADDs of its attachment (plugin/agent/attachments.py)."""

import threading
import time

from pyabouts.plugin.agent.attachments import AddsInFlight


def env(command: str, container: str = "c1", ifname: str = "net1") -> dict[str, str]:
    return {"CNI_COMMAND": command, "CNI_CONTAINERID": container, "CNI_IFNAME": ifname}


def test_a_del_is_served_once_the_adds_of_its_attachment_are_answered() -> None:
    adds = AddsInFlight()
    order: list[str] = []
    first_done, second_done = threading.Event(), threading.Event()

    def add(done: threading.Event, name: str) -> None:
        with adds.serving(env("ADD"), time.monotonic() + 5):
            done.wait(5)
            order.append(name)

    threads = [
        threading.Thread(target=add, args=(e, n))
        for e, n in ((first_done, "add 1"), (second_done, "add 2"))
    ]
    for thread in threads:
        thread.start()
    time.sleep(0.1)  # both ADDs in flight (the runtime tried again meanwhile)
    with adds.serving(env("DEL", "other"), time.monotonic() + 5) as servable:
        assert servable  # another attachment's DEL does not wait

    def delete() -> None:
        with adds.serving(env("DEL"), time.monotonic() + 5) as servable:
            order.append(f"del {servable}")

    deleting = threading.Thread(target=delete)
    deleting.start()
    first_done.set()
    time.sleep(0.1)
    assert order == ["add 1"]  # one ADD of it still in flight
    second_done.set()
    for thread in [*threads, deleting]:
        thread.join(5)
    assert order == ["add 1", "add 2", "del True"]


def test_a_del_whose_add_outlasts_its_deadline_is_not_served() -> None:
    adds = AddsInFlight()
    with adds.serving(env("ADD"), time.monotonic() + 5):
        started = time.monotonic()
        with adds.serving(env("DEL"), started + 0.2) as servable:
            assert not servable
        assert time.monotonic() - started >= 0.2
        with adds.serving(env("CHECK"), started) as servable:
            assert servable  # only DEL waits
    with adds.serving(env("DEL"), time.monotonic()) as servable:
        assert servable
