# Client-side frame parsing (runs under CPython and MicroPython).

from tokenwire.core import protocol


def test_valid_frames_decode():
    cases = [
        ('{"type":"token","id":"a","seq":3,"data":"x","n":2}', 2),
        ('{"type":"token","id":"a","seq":3,"data":"x"}', 1),
    ]
    for text, n in cases:
        frame = protocol.decode(text)
        assert frame["n"] == n
        assert protocol.token_first_seq(frame) == 4 - n
    assert protocol.decode('{"type":"hello","session":"s","node":"n","heartbeat":30,"protocol":1}')
    assert protocol.decode('{"type":"ping","t":5}')["t"] == 5
    assert protocol.decode(
        '{"type":"error","id":null,"code":"bad_frame","message":"m","retryable":false}'
    )


def test_anything_malformed_is_dropped_not_raised():
    bad = [
        "",
        "not json",
        "[]",
        "null",
        "5",
        '"str"',
        "{}",
        '{"type":"nope"}',
        '{"type":"token","id":"a","seq":"3","data":"x"}',
        '{"type":"token","id":"a","seq":3}',
        '{"type":"token","id":"a","seq":3,"data":"x","n":0}',
        '{"type":"token","id":"a","seq":1,"data":"x","n":2}',
        '{"type":"token","id":"a","seq":true,"data":"x"}',
        '{"type":"done","id":"a","seq":1}',
        '{"type":"ack","id":5,"conversation":"c"}',
    ]
    for text in bad:
        assert protocol.decode(text) is None, text


def test_client_frames():
    assert protocol.chat("i", "c", "t") == {
        "type": "chat",
        "id": "i",
        "conversation": "c",
        "text": "t",
    }
    assert protocol.chat("i", "c", "t", after=4)["after"] == 4
    assert protocol.resume("i", 3) == {"type": "resume", "id": "i", "after": 3}
    assert protocol.cancel("i") == {"type": "cancel", "id": "i"}
    assert protocol.pong(7) == {"type": "pong", "t": 7}
    text = protocol.encode(protocol.chat("i", "c", "héllo"))
    assert '"héllo"' in text or "\\u00e9" in text
