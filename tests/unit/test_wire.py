"""The wire format between the node's plugin and the agent, without a socket."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pyabouts.plugin.wire import (
    MAGIC,
    WireError,
    decode_reply,
    decode_request,
    encode_reply,
    encode_request,
)

keys = st.binary(min_size=1, max_size=20).filter(lambda k: b"=" not in k and b"\0" not in k)
values = st.binary(max_size=40).filter(lambda v: b"\0" not in v)


@given(st.dictionaries(keys, values, max_size=8), st.binary(max_size=200))
def test_a_request_round_trips(environ: dict[bytes, bytes], config: bytes) -> None:
    env, stdin = decode_request(encode_request(list(environ.items()), config))
    assert env == {
        k.decode("utf-8", "surrogateescape"): v.decode("utf-8", "surrogateescape")
        for k, v in environ.items()
    }
    assert stdin == config


@given(st.integers(min_value=0, max_value=255), st.binary(max_size=200))
def test_a_reply_round_trips(code: int, stdout: bytes) -> None:
    assert decode_reply(encode_reply(code, stdout)) == (code, stdout)


def test_an_exit_code_may_have_leading_zeros_as_the_shim_reads_it() -> None:
    assert decode_reply(b"0" * 5000 + b"255\0{}") == (255, b"{}")
    with pytest.raises(WireError):
        encode_reply(256, b"")


def test_the_request_is_the_documented_bytes() -> None:
    request = encode_request([(b"CNI_COMMAND", b"ADD"), (b"CNI_IFNAME", b"net1")], b"{}")
    assert request == b"pyabouts/1\nCNI_COMMAND=ADD\0CNI_IFNAME=net1\0\0{}"
    assert encode_reply(0, b"{}") == b"0\0{}"


@pytest.mark.parametrize(
    ("data", "said"),
    [
        (b"", "not a pyabouts request"),
        (b"GET / HTTP/1.1\r\n\r\n", "not a pyabouts request"),
        (MAGIC + b"CNI_COMMAND=ADD", "ended inside its environment"),
        (MAGIC + b"CNI_COMMAND\0\0{}", "without a KEY="),
        (MAGIC + b"=ADD\0\0{}", "without a KEY="),
    ],
)
def test_a_malformed_request_is_refused(data: bytes, said: str) -> None:
    with pytest.raises(WireError, match=said):
        decode_request(data)


@pytest.mark.parametrize(
    "data", [b"", b"0", b"x\0{}", b"-1\0{}", b" 0\0{}", b"256\0{}", b"9" * 5000 + b"\0{}"]
)
def test_a_reply_cut_short_or_garbled_is_refused(data: bytes) -> None:
    with pytest.raises(WireError):
        decode_reply(data)


@pytest.mark.parametrize(
    "environ", [[(b"", b"x")], [(b"A=B", b"x")], [(b"A\0", b"x")], [(b"A", b"x\0y")]]
)
def test_what_cannot_be_framed_is_refused(environ: list[tuple[bytes, bytes]]) -> None:
    with pytest.raises(WireError):
        encode_request(environ, b"{}")
