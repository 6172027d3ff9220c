# The offline queue (runs under CPython and MicroPython).

from tokenwire.core.outbox import QUEUED, SENT, Outbox


def ids(outbox):
    return [m["id"] for m in outbox.items]


def test_one_message_in_flight_at_a_time_in_order():
    o = Outbox()
    o.add("1", "c", "first")
    o.add("2", "c", "second")
    assert o.next_to_send()["id"] == "1"
    o.mark_sent("1")
    assert o.next_to_send() is None  # waits for the ack
    assert o.acked("1")["text"] == "first"
    assert o.next_to_send()["id"] == "2"


def test_a_failed_message_is_retried_before_those_behind_it():
    o = Outbox()
    o.add("1", "c", "a")
    o.add("2", "c", "b")
    o.mark_sent("1")
    o.failed("1")
    assert o.next_to_send()["id"] == "1"
    assert o.items[0]["state"] == QUEUED


def test_disconnect_requeues_what_was_in_flight_with_the_same_id():
    o = Outbox()
    o.add("1", "c", "a")
    o.mark_sent("1")
    assert o.items[0]["state"] == SENT
    o.disconnected()
    assert o.next_to_send()["id"] == "1"


def test_cancel_conversation_drops_only_its_messages():
    o = Outbox()
    o.add("1", "c1", "a")
    o.add("2", "c2", "b")
    o.add("3", "c1", "c")
    assert o.cancel_conversation("c1") == ["1", "3"]
    assert ids(o) == ["2"]
    assert [m["id"] for m in o.pending("c2")] == ["2"]


def test_only_a_message_never_sent_can_be_cancelled():
    # Once on the wire the server may have stored it (its ack lost with the connection):
    # cancelling could not keep the promise that it is never sent.
    o = Outbox()
    o.add("1", "c", "a")
    o.add("2", "c", "b")
    o.add("3", "c", "c")
    o.mark_sent("1")
    o.disconnected()
    assert not o.cancellable("1")
    assert o.cancellable("2")
    assert o.cancel("1") is None
    assert o.cancel("2")["text"] == "b"
    assert o.cancel("2") is None
    assert o.cancel_conversation("c") == ["3"]
    assert ids(o) == ["1"]
    # A reload keeps knowing it was sent.
    restored = Outbox()
    restored.loads(o.dumps())
    assert not restored.cancellable("1")
    assert restored.cancel("1") is None


def test_survives_a_reload_through_dumps_and_loads():
    o = Outbox()
    o.add("1", "c", 'héllo \u2028 "quoted"')
    o.add("2", "c", "b")
    o.mark_sent("1")
    restored = Outbox()
    restored.loads(o.dumps())
    assert ids(restored) == ["1", "2"]
    assert restored.items[0]["text"] == 'héllo \u2028 "quoted"'
    assert restored.items[0]["state"] == QUEUED  # after a reload nothing is in flight


def test_loads_ignores_garbage():
    o = Outbox()
    for bad in ["", "{", "[1, 2]", '{"a": 1}', '[["1", "c"]]', '[["1", "c", 3]]', "null"]:
        o.loads(bad)
        assert o.items == []
    o.loads('[["1", "c", "x"], "junk"]')
    assert ids(o) == ["1"]
    assert o.cancellable("1")  # saved before `tried` existed: never sent
    o.loads('[["1", "c", "x", 1], ["2", "c", "y", 0], ["3", "c", "z", 0, 0]]')
    assert ids(o) == ["1", "2"]
    assert not o.cancellable("1")
    assert o.cancellable("2")


def test_acked_of_unknown_id_is_none():
    o = Outbox()
    assert o.acked("nope") is None
