"""MQTT packet encoding and splitting (connectors/mqtt/wire.py), against packets built from the spec."""

from __future__ import annotations

import struct

import pytest

from connectors.mqtt import wire


def publish(topic: bytes, payload: bytes, mid: int = 0, qos: int = 0, props: bytes | None = None) -> bytes:
    var = struct.pack("!H", len(topic)) + topic + (struct.pack("!H", mid) if qos else b"")
    if props is not None:
        var += wire.varint(len(props)) + props
    body = var + payload
    return bytes([0x30 | qos << 1]) + wire.varint(len(body)) + body


@pytest.mark.parametrize("n", [0, 1, 127, 128, 16_383, 16_384, 2_097_151, 2_097_152, 268_435_455])
def test_varint_round_trip(n):
    enc = wire.varint(n)
    assert len(enc) == 1 + (n >= 128) + (n >= 16_384) + (n >= 2_097_152)
    assert wire._read_varint(enc + b"\xff", 0) == (n, len(enc))


def test_split_publishes_and_control_packets_in_order():
    stream = (
        publish(b"a/b", b"1.5", 1, 1)
        + b"\xd0\x00"  # PINGRESP
        + publish(b"a/c", b'{"value": 2}', 0, 0)
        + publish(b"x" * 300, b"y" * 70_000, 65535, 1)
    )
    pubs, ctrl, used = wire.split(stream, wire.V311)
    assert used == len(stream)
    assert pubs == [
        (b"a/b", b"1.5", 1, 1),
        (b"a/c", b'{"value": 2}', 0, 0),
        (b"x" * 300, b"y" * 70_000, 65535, 1),
    ]
    assert ctrl == [(wire.PINGRESP, 0, b"")]


def test_split_keeps_incomplete_packets_for_the_next_read():
    stream = publish(b"t/1", b"10", 7, 1) + publish(b"t/2", b"x" * 200, 8, 1) + b"\x90\x03\x00\x01\x01"
    for cut in range(len(stream) + 1):
        got: list[wire.Publish] = []
        ctrl: list[wire.Control] = []
        rest = b""
        for part in (stream[:cut], stream[cut:]):
            buf = rest + part
            p, c, used = wire.split(buf, wire.V311)
            got += p
            ctrl += c
            rest = buf[used:]
        assert rest == b""
        assert [(t, m) for t, _, m, _ in got] == [(b"t/1", 7), (b"t/2", 8)]
        assert ctrl == [(wire.SUBACK, 0, b"\x00\x01\x01")]


def test_split_mqtt5_properties_are_skipped():
    # payload format indicator + a user property pair
    props = b"\x01\x01" + b"\x26" + struct.pack("!H", 1) + b"k" + struct.pack("!H", 2) + b"vv"
    stream = publish(b"s/d/p", b"42", 3, 1, props) + publish(b"s/d/q", b"43", 4, 1, b"")
    pubs, _, used = wire.split(stream, wire.V5)
    assert used == len(stream)
    assert pubs == [(b"s/d/p", b"42", 3, 1), (b"s/d/q", b"43", 4, 1)]


def test_split_refuses_topic_aliases_and_nonsense():
    with pytest.raises(wire.ProtocolError):
        wire.split(publish(b"t", b"1", 1, 1, b"\x23\x00\x01"), wire.V5)
    with pytest.raises(wire.ProtocolError):
        wire.split(b"\x36\x04\x00\x01t\x00", wire.V311)  # QoS 3
    with pytest.raises(wire.ProtocolError):
        wire.split(b"\x32\x03\x00\x09t", wire.V311)  # topic longer than the packet


def test_pubacks_are_concatenated_puback_packets():
    assert wire.pubacks([1, 258, 65535]) == b"\x40\x02\x00\x01" + b"\x40\x02\x01\x02" + b"\x40\x02\xff\xff"
    assert wire.pubacks([]) == b""


def test_connect_packets():
    v3 = wire.connect("cid", keepalive=30, version=wire.V311, username="u", password="p")
    assert v3[:2] == bytes([0x10, len(v3) - 2])
    # level 4, username and password flags, clean session off, keepalive 30
    assert v3[2:] == b"\x00\x04MQTT\x04\xc0\x00\x1e" + b"\x00\x03cid\x00\x01u\x00\x01p"
    v5 = wire.connect("cid", keepalive=30, version=wire.V5, receive_maximum=10_000)
    assert v5[:2] == bytes([0x10, len(v5) - 2])
    # level 5, clean start off; properties: session expiry "never", receive maximum 10,000
    assert (
        v5[2:] == b"\x00\x04MQTT\x05\x00\x00\x1e" + b"\x08\x11\xff\xff\xff\xff\x21\x27\x10" + b"\x00\x03cid"
    )


def test_subscribe_packets():
    assert wire.subscribe(1, [("a/+", 1)], wire.V311) == b"\x82\x08\x00\x01\x00\x03a/+\x01"
    # MQTT 5: empty properties, retain handling 1 (retained messages only for a new subscription)
    assert wire.subscribe(1, [("a/+", 1)], wire.V5) == b"\x82\x09\x00\x01\x00\x00\x03a/+\x11"


def test_connack_suback_disconnect():
    assert wire.parse_connack(b"\x01\x00", wire.V311) == wire.Connack(True, 0)
    refused = wire.parse_connack(b"\x00\x01", wire.V5)  # a 3.1.1 broker answering a level-5 CONNECT
    assert refused.unsupported_version
    props = b"\x13\x00\x3c" + b"\x1f" + struct.pack("!H", 2) + b"ok"
    ack = wire.parse_connack(b"\x00\x00" + wire.varint(len(props)) + props, wire.V5)
    assert ack == wire.Connack(False, 0, 60, "ok")
    assert wire.parse_suback(b"\x00\x05\x01\x80", wire.V311) == (5, [1, 0x80])
    assert wire.parse_suback(b"\x00\x05\x00\x01", wire.V5) == (5, [1])
    assert wire.parse_disconnect(b"", wire.V5) == (0, None)
    assert wire.parse_disconnect(b"\x8e\x00", wire.V5) == (0x8E, None)


def test_first_packet():
    assert wire.first_packet(b"\x20") is None
    assert wire.first_packet(b"\x20\x03\x00\x00") is None
    assert wire.first_packet(b"\x20\x02\x00\x00\x30") == ((wire.CONNACK, 0, b"\x00\x00"), 4)


def test_split_properties_longer_than_127_bytes_and_bounded_by_their_packet():
    props = b"\x26" + struct.pack("!H", 100) + b"k" * 100 + struct.pack("!H", 100) + b"v" * 100  # 205 bytes
    stream = publish(b"s/d/p", b"1", 1, 1, props) + publish(b"s/d/q", b"2", 2, 1, b"")
    pubs, _, used = wire.split(stream, wire.V5)
    assert used == len(stream)
    assert pubs == [(b"s/d/p", b"1", 1, 1), (b"s/d/q", b"2", 2, 1)]
    # A property length that reaches into the next packet is an error, not a read of the next packet.
    bad = publish(b"s/d/p", b"", 1, 1, b"\x01") + publish(b"s/d/q", b"2", 2, 1, b"")
    with pytest.raises(wire.ProtocolError):
        wire.split(bad, wire.V5)


def test_connack_refusals_in_words():
    assert wire.parse_connack(b"\x00\x05", wire.V311).describe() == "code 0x05 (not authorized)"
    props = b"\x1f" + struct.pack("!H", 4) + b"nope"
    ack = wire.parse_connack(b"\x00\x86" + wire.varint(len(props)) + props, wire.V5)
    assert ack.describe() == "code 0x86 (bad user name or password): nope"
    assert not ack.unsupported_version


# -- the reader: what one packet can cost ---------------------------------------------------------------

LIMIT = 64 * 1024


def feed_all(reader: wire.Reader, stream: bytes, chunk: int) -> tuple[list, list, list, int]:
    """Feed ``stream`` in ``chunk``-byte reads; (publishes, control packets, oversized, peak buffered)."""
    pubs: list[wire.Publish] = []
    ctrl: list[wire.Control] = []
    over: list[wire.Oversized] = []
    peak = 0
    for i in range(0, len(stream), chunk):
        p, c, o = reader.feed(stream[i : i + chunk])
        pubs += p
        ctrl += c
        over += o
        peak = max(peak, reader.buffered)
    return pubs, ctrl, over, peak


def test_reader_gives_every_packet_whatever_the_reads():
    exact = publish(b"t/4", b"z" * (LIMIT - 11), 10, 1)
    one_over = publish(b"t/3", b"y" * (LIMIT - 10), 9, 1)
    assert (len(exact), len(one_over)) == (LIMIT, LIMIT + 1)
    stream = (
        publish(b"t/1", b"10", 7, 1) + b"\xd0\x00" + publish(b"t/2", b"x" * 20_000, 8, 1) + one_over + exact
    )
    for chunk in (1, 7, 1000, 65_536, len(stream)):
        pubs, ctrl, over, peak = feed_all(wire.Reader(wire.V311, LIMIT), stream, chunk)
        assert [(t, m) for t, _, m, _ in pubs] == [(b"t/1", 7), (b"t/2", 8), (b"t/4", 10)], chunk
        assert ctrl == [(wire.PINGRESP, 0, b"")]
        assert over == [wire.Oversized(b"t/3", b"y" * wire.OVERSIZED_HEAD, 9, 1, LIMIT + 1)]
        assert peak <= LIMIT


def test_an_oversized_publish_is_dropped_as_it_streams_in():
    """5 MB of payload in 64 KiB reads against a 1 MiB limit: nothing of it is held but its topic, packet
    identifier and first payload bytes, and what follows it is read as usual."""
    limit = 1 << 20
    big = publish(b"plant/s1/cam/frame", bytes(range(256)) * 20_480, 4242, 1)  # 5 MiB of payload
    stream = big + publish(b"plant/s1/d1/t", b"21.5", 4243, 1) + b"\xd0\x00"
    reader = wire.Reader(wire.V311, limit)
    pubs, ctrl, over, peak = feed_all(reader, stream, 65_536)
    assert peak <= 2 + len(b"plant/s1/cam/frame") + 2 + wire.OVERSIZED_HEAD
    assert over == [wire.Oversized(b"plant/s1/cam/frame", bytes(range(256)), 4242, 1, len(big))]
    assert pubs == [(b"plant/s1/d1/t", b"21.5", 4243, 1)]
    assert ctrl == [(wire.PINGRESP, 0, b"")]
    assert reader.buffered == 0


def test_the_size_is_judged_from_the_fixed_header_alone():
    reader = wire.Reader(wire.V311, LIMIT)
    header = b"\x32" + wire.varint(200_000_000)  # a PUBLISH of 200 MB announced
    assert reader.feed(header) == ([], [], [])
    assert reader.buffered == 0  # not waiting to hold it: dropping it
    body = struct.pack("!H", 1) + b"t" + struct.pack("!H", 5)
    reader.feed(body + b"p" * 1000)
    assert reader.buffered == len(body) + wire.OVERSIZED_HEAD


def test_an_oversized_mqtt5_publish_keeps_its_payload_head_after_short_properties():
    props = b"\x03" + struct.pack("!H", 4) + b"text"  # content type
    stream = publish(b"a/b", b"P" * 100_000, 3, 1, props) + publish(b"a/c", b"1", 4, 1, b"")
    pubs, _, over, _ = feed_all(wire.Reader(wire.V5, LIMIT), stream, 4096)
    assert over == [wire.Oversized(b"a/b", b"P" * wire.OVERSIZED_HEAD, 3, 1, len(stream) - 11)]
    assert pubs == [(b"a/c", b"1", 4, 1)]
    # properties too long to keep: the message is still reported and acknowledged, without payload bytes
    long_props = b"\x26" + struct.pack("!H", 5000) + b"k" * 5000 + struct.pack("!H", 1) + b"v"
    stream = publish(b"a/b", b"P" * 100_000, 5, 1, long_props)
    _, _, over, peak = feed_all(wire.Reader(wire.V5, LIMIT), stream, 4096)
    assert [(o.topic, o.mid, o.head) for o in over] == [(b"a/b", 5, b"")]
    assert peak < 100


@pytest.mark.parametrize(
    "stream",
    [
        pytest.param(b"\x30\xff\xff\xff\xff\x01", id="remaining length of five bytes"),
        pytest.param(publish(b"t", b"1") + b"\x30\x80\x80\x80\x80", id="five-byte length after a packet"),
        pytest.param(b"\x90" + wire.varint(LIMIT) + b"\x00" * 10, id="oversized SUBACK"),
        pytest.param(b"\x36" + wire.varint(LIMIT) + b"\x00" * 10, id="oversized PUBLISH with QoS 3"),
        pytest.param(
            b"\x32" + wire.varint(LIMIT) + struct.pack("!H", 65535) + b"t" * (LIMIT - 2),
            id="oversized PUBLISH shorter than its topic",
        ),
        pytest.param(b"\x32\x03\x00\x09t", id="PUBLISH shorter than its topic"),
    ],
)
def test_malformed_packets_are_protocol_errors(stream):
    with pytest.raises(wire.ProtocolError):
        feed_all(wire.Reader(wire.V311, LIMIT), stream, 3)


@pytest.mark.parametrize(
    "stream",
    [
        pytest.param(publish(b"t", b"1", 1, 1, b"\x01"), id="properties past the end"),
        pytest.param(publish(b"t", b"1", 1, 1, b"\x02\x00\x00"), id="truncated property"),
        pytest.param(publish(b"t", b"1", 1, 1, b"\x7f\x00"), id="unknown property"),
        pytest.param(
            b"\x32" + wire.varint(LIMIT) + b"\x00\x01t\x00\x01" + wire.varint(LIMIT),
            id="oversized PUBLISH whose properties pass its end",
        ),
    ],
)
def test_malformed_mqtt5_properties_are_protocol_errors(stream):
    with pytest.raises(wire.ProtocolError):
        feed_all(wire.Reader(wire.V5, LIMIT), stream + b"\x00" * LIMIT, 4096)


def test_an_incomplete_packet_is_held_only_up_to_its_size():
    reader = wire.Reader(wire.V311, LIMIT)
    packet = publish(b"t", b"x" * 50_000, 1, 1)
    for i in range(0, len(packet) - 1, 1000):
        assert reader.feed(packet[i : min(i + 1000, len(packet) - 1)]) == ([], [], [])
    assert reader.buffered == len(packet) - 1
    assert reader.feed(packet[-1:]) == ([(b"t", b"x" * 50_000, 1, 1)], [], [])
    assert reader.buffered == 0


def test_reader_limits_are_those_mqtt_can_frame():
    with pytest.raises(ValueError):
        wire.Reader(wire.V5, 100)
    with pytest.raises(ValueError):
        wire.Reader(wire.V5, wire.MAX_PACKET_SIZE + 1)


def test_connect_asks_for_a_maximum_packet_size_in_mqtt5_only():
    v5 = wire.connect("cid", keepalive=30, version=wire.V5, maximum_packet_size=1 << 20)
    assert v5[12:23] == b"\x0a\x11\xff\xff\xff\xff\x27\x00\x10\x00\x00"
    v3 = wire.connect("cid", keepalive=30, version=wire.V311, maximum_packet_size=1 << 20)
    assert v3 == wire.connect("cid", keepalive=30, version=wire.V311)


def test_first_packet_refuses_one_over_the_limit_from_its_header():
    with pytest.raises(wire.ProtocolError):
        wire.first_packet(b"\x20" + wire.varint(5000), limit=4096)
