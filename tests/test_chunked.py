"""The chunked transfer decoder: payload out as it arrives, for every cut; broken framing refused."""

from __future__ import annotations

import itertools

import pytest

from wsgi_proxy.wire.chunked import MAX_LINE, ChunkDecoder, ChunkedFramingError

BODIES: list[tuple[str, bytes, bytes]] = [
    ("one_chunk", b"5\r\nhello\r\n0\r\n\r\n", b"hello"),
    ("two_chunks", b"5\r\nhello\r\n1\r\n!\r\n0\r\n\r\n", b"hello!"),
    ("lowercase_hex_and_lf_only", b"a\n0123456789\n0\n\n", b"0123456789"),
    ("uppercase_hex", b"B\r\nhello world\r\n0\r\n\r\n", b"hello world"),
    ("extension", b"5;name=value\r\nhello\r\n0;x\r\n\r\n", b"hello"),
    ("padded_size", b"5 \r\nhello\r\n0\r\n\r\n", b"hello"),
    ("crlf_in_data", b"4\r\n\r\n\r\n\r\n0\r\n\r\n", b"\r\n\r\n"),
    ("trailer_ignored", b"2\r\nok\r\n0\r\nX-T: 1\r\n\r\n", b"ok"),
    ("mixed_line_ends", b"5\r\nhello\n3;e\r\nabc\r\n 2 \n!!\r\n0\n", b"helloabc!!"),
    ("bytes_after_the_end", b"2\r\nok\r\n0\r\n\r\nHTTP/1.1 200 OK\r\n", b"ok"),
]


def _decode(body: bytes, cuts: tuple[int, ...]) -> tuple[bytes, ChunkDecoder]:
    decoder = ChunkDecoder()
    out = b""
    for start, stop in itertools.pairwise((0, *cuts, len(body))):
        out += decoder.feed(body[start:stop])
    return out, decoder


@pytest.mark.parametrize(("body", "payload"), [b[1:] for b in BODIES], ids=[b[0] for b in BODIES])
def test_every_pair_of_cuts_gives_the_payload_and_the_end(body: bytes, payload: bytes) -> None:
    for cuts in itertools.chain(
        [()], ((c,) for c in range(1, len(body))), itertools.combinations(range(1, len(body)), 2)
    ):
        out, decoder = _decode(body, cuts)
        assert out == payload, cuts
        assert decoder.done, cuts


def test_a_chunks_first_bytes_come_out_before_its_last_arrive() -> None:
    decoder = ChunkDecoder()
    assert decoder.feed(b"a\r\nhel") == b"hel"
    assert decoder.feed(b"lo") == b"lo"
    assert not decoder.done
    assert decoder.feed(b"world\r\n0\r\n") == b"world"
    assert decoder.done


@pytest.mark.parametrize(
    "body",
    [
        b"zz\r\nhello\r\n",  # not hex
        b"0x5\r\nhello\r\n",  # int(..., 16) would take it
        b"+5\r\nhello\r\n",
        b"5_0\r\nhello\r\n",
        b"\r\nhello\r\n",  # no size at all
        b"5\r\nhello!\r\n",  # data longer than the size said
        b"1" * 17 + b"\r\n",  # more than 16 hex digits
    ],
    ids=["not_hex", "0x_prefix", "plus_sign", "underscore", "empty_size", "data_overrun", "huge_size"],
)
def test_broken_framing_is_refused(body: bytes) -> None:
    with pytest.raises(ChunkedFramingError):
        ChunkDecoder().feed(body)


def test_a_size_line_that_never_ends_is_refused_at_the_limit() -> None:
    decoder = ChunkDecoder()
    decoder.feed(b"5" * MAX_LINE)  # at the limit, not past it
    with pytest.raises(ChunkedFramingError, match=str(MAX_LINE)):
        decoder.feed(b"5")


@pytest.mark.parametrize(
    ("fed", "ahead", "expected"),
    [
        (b"", b"", False),
        (b"", b"5\r\nh", True),  # a size line and a first byte
        (b"", b"5\r\n", False),  # a size line alone: the read would wait for the data
        (b"", b"5", False),  # half a size line
        (b"5\r\nhel", b"l", True),  # inside a chunk
        (b"5\r\nhel", b"", False),
        (b"5\r\nhello", b"\r\n", False),  # only the line end after the data
        (b"5\r\nhello", b"\r\n3\r\nabc", True),
        (b"5\r\nhello", b"\r\n0\r\n", True),  # the end: the read returns b"" at once
        (b"", b"zz\r\n", True),  # broken framing: the read reports it at once
    ],
)
def test_would_yield_says_whether_a_read_would_return_without_the_network(
    fed: bytes, ahead: bytes, expected: bool
) -> None:
    decoder, untouched = ChunkDecoder(), ChunkDecoder()
    decoder.feed(fed)
    untouched.feed(fed)
    assert decoder.would_yield(ahead) is expected
    assert decoder == untouched  # asking consumed nothing
