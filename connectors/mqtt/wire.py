"""MQTT packets of a subscribing client (MQTT 5.0 and 3.1.1): encode what it sends, split what it reads.

Only what a QoS 0/1 subscriber needs: CONNECT, SUBSCRIBE, PUBACK, PINGREQ and DISCONNECT out; CONNACK,
PUBLISH, SUBACK, PINGRESP and DISCONNECT in. Pure functions over bytes, no sockets: unit-tested on their own.

The receive path is the connector's hot loop, so :func:`split` decodes a whole buffer of packets in one call
and hands PUBLISH packets back as plain tuples. :class:`Reader` feeds it the reads of one connection and
bounds what a packet can cost: it never holds more than the maximum packet size of an incomplete packet, and
a PUBLISH over that size is dropped as it streams in, but for what is needed to acknowledge and report it.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

CONNECT, CONNACK, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP = 1, 2, 3, 4, 5, 6, 7
SUBSCRIBE, SUBACK, UNSUBSCRIBE, UNSUBACK, PINGREQ, PINGRESP, DISCONNECT, AUTH = range(8, 16)

V311, V5 = 4, 5  # protocol levels

# The largest packet MQTT can frame: 1 byte of type and flags, 4 of remaining length, 268,435,455 of body.
MAX_PACKET_SIZE = 1 + 4 + 268_435_455
# The smallest limit a Reader takes: any packet whose remaining length fits one byte is below it, so the
# hot path of split() never compares sizes.
MIN_PACKET_SIZE = 1024
# Payload bytes kept of a PUBLISH over the limit (for the dead letter), and the longest MQTT 5 properties
# read through to reach them.
OVERSIZED_HEAD = 256
_OVERSIZED_PROPERTIES = 4096

PINGREQ_PACKET = b"\xc0\x00"
DISCONNECT_PACKET = b"\xe0\x00"  # 3.1.1, and 5.0 with reason "normal disconnection"

# MQTT 5 property identifiers used here
_SESSION_EXPIRY = 0x11
_RECEIVE_MAXIMUM = 0x21
_SERVER_KEEP_ALIVE = 0x13
_REASON_STRING = 0x1F
_ASSIGNED_CLIENT_ID = 0x12
_TOPIC_ALIAS = 0x23
_MAXIMUM_PACKET_SIZE = 0x27

# Property identifier -> size of its value; -1 for variable byte integer, -2 for 2-byte-length data, -3 for
# a string pair (user property). MQTT 5.0, 2.2.2.2.
_PROPERTY_SIZES: dict[int, int] = {
    0x01: 1, 0x02: 4, 0x03: -2, 0x08: -2, 0x09: -2, 0x0B: -1, 0x11: 4, 0x12: -2, 0x13: 2, 0x15: -2,
    0x16: -2, 0x17: 1, 0x18: 4, 0x19: 1, 0x1A: -2, 0x1C: -2, 0x1F: -2, 0x21: 2, 0x22: 2, 0x23: 2,
    0x24: 1, 0x25: 1, 0x26: -3, 0x27: 4, 0x28: 1, 0x29: 1, 0x2A: 1,
}  # fmt: skip


class ProtocolError(Exception):
    """The peer sent something that is not MQTT, or not what the protocol allows here."""


def varint(n: int) -> bytes:
    """Variable byte integer (the remaining length, property lengths)."""
    if not 0 <= n <= 268_435_455:
        raise ValueError(f"{n} does not fit a variable byte integer")
    out = bytearray()
    while True:
        n, b = n >> 7, n & 0x7F
        out.append(b | 0x80 if n else b)
        if not n:
            return bytes(out)


def _read_varint(buf: bytes | bytearray, i: int) -> tuple[int, int]:
    """(value, index after it); raises IndexError when the buffer ends inside it."""
    value, shift = 0, 0
    while True:
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, i
        shift += 7
        if shift > 21:
            raise ProtocolError("variable byte integer longer than 4 bytes")


def _str(s: str | bytes) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    if len(b) > 65535:
        raise ValueError("string longer than 65,535 bytes")
    return struct.pack("!H", len(b)) + b


def _packet(first: int, body: bytes) -> bytes:
    return bytes([first]) + varint(len(body)) + body


def connect(
    client_id: str,
    *,
    keepalive: int,
    version: int,
    clean: bool = False,
    username: str | None = None,
    password: str | None = None,
    receive_maximum: int | None = None,
    session_expiry: int = 0xFFFFFFFF,
    maximum_packet_size: int | None = None,
) -> bytes:
    """CONNECT. Version 5: the session outlives the connection for ``session_expiry`` seconds (0xFFFFFFFF:
    for ever, as a 3.1.1 persistent session), the server sends at most ``receive_maximum`` unacknowledged
    QoS 1 messages at once and no packet larger than ``maximum_packet_size`` bytes."""
    flags = 0x02 if clean else 0
    payload = _str(client_id)
    if username is not None:
        flags |= 0x80
        payload += _str(username)
        if password is not None:
            flags |= 0x40
            payload += _str(password)
    var = _str("MQTT") + bytes([version, flags]) + struct.pack("!H", keepalive)
    if version == V5:
        props = b""
        props += bytes([_SESSION_EXPIRY]) + struct.pack("!I", session_expiry)
        if receive_maximum is not None:
            props += bytes([_RECEIVE_MAXIMUM]) + struct.pack("!H", max(1, min(65535, receive_maximum)))
        if maximum_packet_size is not None:
            size = max(1, min(MAX_PACKET_SIZE, maximum_packet_size))
            props += bytes([_MAXIMUM_PACKET_SIZE]) + struct.pack("!I", size)
        var += varint(len(props)) + props
    return _packet(CONNECT << 4, var + payload)


def subscribe(packet_id: int, filters: list[tuple[str, int]], version: int) -> bytes:
    """SUBSCRIBE. Version 5 asks for retained messages only when the subscription is new (retain handling
    1): re-subscribing on every reconnect then does not replay them."""
    body = struct.pack("!H", packet_id)
    if version == V5:
        body += b"\x00"  # no properties
    for f, qos in filters:
        body += _str(f) + bytes([qos | (0x10 if version == V5 else 0)])
    return _packet(SUBSCRIBE << 4 | 0x02, body)


_PUBACKS: dict[int, struct.Struct] = {}


def pubacks(mids: list[int]) -> bytes:
    """PUBACKs for these packet identifiers, concatenated: one write acknowledges them all. The 2-byte form
    is valid in both versions (5.0 allows omitting the reason code when it is Success)."""
    n = len(mids)
    s = _PUBACKS.get(n)
    if s is None:
        s = struct.Struct(f"!{n}I")
        if n <= 4096:
            _PUBACKS[n] = s
    # 0x40 PUBACK, 0x02 remaining length, then the 16-bit packet identifier: one big-endian 32-bit word.
    return s.pack(*[0x40020000 | m for m in mids])


@dataclass(frozen=True)
class Connack:
    session_present: bool
    code: int  # 0 accepted; 3.1.1 return code or 5.0 reason code otherwise
    server_keepalive: int | None = None
    reason: str | None = None

    @property
    def unsupported_version(self) -> bool:
        # 3.1.1 return code 1 "unacceptable protocol version"; 5.0 reason 0x84 "unsupported protocol version"
        return self.code in (0x01, 0x84)

    def describe(self) -> str:
        """The refusal in words: the code, its meaning, and the broker's reason string if it sent one."""
        text = _CONNACK_CODES.get(self.code, "refused")
        return f"code 0x{self.code:02x} ({text})" + (f": {self.reason}" if self.reason else "")


# CONNACK codes: 1-5 are MQTT 3.1.1 return codes, 0x80 and up MQTT 5.0 reason codes.
_CONNACK_CODES = {
    0x01: "unacceptable protocol version",
    0x02: "client identifier rejected",
    0x03: "server unavailable",
    0x04: "bad user name or password",
    0x05: "not authorized",
    0x80: "unspecified error",
    0x81: "malformed packet",
    0x82: "protocol error",
    0x83: "implementation specific error",
    0x84: "unsupported protocol version",
    0x85: "client identifier not valid",
    0x86: "bad user name or password",
    0x87: "not authorized",
    0x88: "server unavailable",
    0x89: "server busy",
    0x8A: "banned",
    0x8C: "bad authentication method",
    0x95: "packet too large",
    0x97: "quota exceeded",
    0x9F: "connection rate exceeded",
}


def _properties(buf: bytes, i: int, limit: int | None = None) -> tuple[dict[int, int | bytes], int]:
    """MQTT 5 properties at ``i`` of a packet ending at ``limit`` (default: the end of ``buf``):
    ({id: value of the last occurrence}, index after them)."""
    limit = len(buf) if limit is None else limit
    out: dict[int, int | bytes] = {}
    try:
        length, i = _read_varint(buf, i)
        end = i + length
        if end > limit:
            raise ProtocolError("properties run past the end of the packet")
        while i < end:
            pid = buf[i]
            i += 1
            size = _PROPERTY_SIZES.get(pid)
            if size is None:
                raise ProtocolError(f"unknown property 0x{pid:02x}")
            value: int | bytes
            if size > 0:
                value = int.from_bytes(buf[i : i + size], "big")
                i += size
            elif size == -1:
                value, i = _read_varint(buf, i)
            else:
                n = (buf[i] << 8) | buf[i + 1]
                value = bytes(buf[i + 2 : i + 2 + n])
                i += 2 + n
                if size == -3:  # user property: a second string follows
                    i += 2 + ((buf[i] << 8) | buf[i + 1])
            out[pid] = value
    except IndexError:
        raise ProtocolError("properties run past the end of the packet") from None
    if i != end:
        raise ProtocolError("malformed properties")
    return out, end


def parse_connack(body: bytes, version: int) -> Connack:
    if len(body) < 2:
        raise ProtocolError("CONNACK shorter than 2 bytes")
    present, code = bool(body[0] & 1), body[1]
    if version == V5 and len(body) > 2:
        props, _ = _properties(body, 2)
        ka = props.get(_SERVER_KEEP_ALIVE)
        reason = props.get(_REASON_STRING)
        return Connack(
            present,
            code,
            ka if isinstance(ka, int) else None,
            reason.decode("utf-8", "replace") if isinstance(reason, bytes) else None,
        )
    return Connack(present, code)


def parse_suback(body: bytes, version: int) -> tuple[int, list[int]]:
    """(packet identifier, one return/reason code per filter: 0-2 granted QoS, >= 0x80 refused)."""
    if len(body) < 3:
        raise ProtocolError("SUBACK shorter than 3 bytes")
    pid = int.from_bytes(body[:2], "big")
    i = 2
    if version == V5:
        _, i = _properties(body, 2)
    return pid, list(body[i:])


def parse_disconnect(body: bytes, version: int) -> tuple[int, str | None]:
    """(reason code, reason string) of a server DISCONNECT (MQTT 5 only; empty body: normal)."""
    if not body:
        return 0, None
    reason = None
    if version == V5 and len(body) > 1:
        props, _ = _properties(body, 1)
        r = props.get(_REASON_STRING)
        reason = r.decode("utf-8", "replace") if isinstance(r, bytes) else None
    return body[0], reason


Publish = tuple[bytes, bytes, int, int]  # (topic, payload, packet identifier or 0, qos)
Control = tuple[int, int, bytes]  # (packet type, flags, body)


def first_packet(buf: bytes, limit: int = MAX_PACKET_SIZE) -> tuple[Control, int] | None:
    """The first complete packet in ``buf`` and the bytes it took, or None while it is incomplete. A packet
    larger than ``limit`` bytes is an error as soon as its fixed header is in: it would not be waited for."""
    if len(buf) < 2:
        return None
    try:
        length, j = _read_varint(buf, 1)
    except IndexError:
        return None
    if j + length > limit:
        raise ProtocolError(f"packet type {buf[0] >> 4} of {j + length} bytes exceeds the maximum of {limit}")
    if j + length > len(buf):
        return None
    return (buf[0] >> 4, buf[0] & 0x0F, buf[j : j + length]), j + length


def split(buf: bytes, version: int, limit: int = MAX_PACKET_SIZE) -> tuple[list[Publish], list[Control], int]:
    """Every complete packet in ``buf``: (PUBLISH packets in order, other packets in order, bytes used).

    The bytes after the last complete packet belong to the next read. Topics stay bytes: the caller keys a
    cache by them and decodes only what it has not seen. Splitting also stops at the first packet larger
    than ``limit`` bytes (at least 130), complete or not: :class:`Reader` decides what becomes of it.
    """
    pubs: list[Publish] = []
    ctrl: list[Control] = []
    n = len(buf)
    i = 0
    v5 = version == V5
    while i + 2 <= n:
        first = buf[i]
        b = buf[i + 1]
        if b < 0x80:  # remaining length in one byte: every small PUBLISH
            length, j = b, i + 2
        else:
            try:
                length, j = _read_varint(buf, i + 1)
            except IndexError:
                break
            if j - i + length > limit:
                break
        end = j + length
        if end > n:
            break
        if first >> 4 == PUBLISH:
            qos = (first >> 1) & 3
            if qos == 3:
                raise ProtocolError("PUBLISH with QoS 3")
            if length < 2:
                raise ProtocolError("PUBLISH shorter than its topic length")
            t_end = j + 2 + ((buf[j] << 8) | buf[j + 1])
            p = t_end + (2 if qos else 0) + (1 if v5 else 0)
            if p > end:
                raise ProtocolError("PUBLISH shorter than its header")
            mid = (buf[t_end] << 8) | buf[t_end + 1] if qos else 0
            if v5 and buf[p - 1]:  # properties (none is the usual case)
                props, p = _properties(buf, p - 1, end)
                if _TOPIC_ALIAS in props:
                    # Never allowed: the CONNECT leaves Topic Alias Maximum at 0.
                    raise ProtocolError("PUBLISH with a topic alias")
            pubs.append((buf[j + 2 : t_end], buf[p:end], mid, qos))
        else:
            ctrl.append((first >> 4, first & 0x0F, buf[j:end]))
        i = end
    return pubs, ctrl, i


def _header(buf: bytes, i: int) -> tuple[int, int, int] | None:
    """(first byte, remaining length, index of the body) of the packet at ``i``; None while incomplete."""
    if len(buf) < i + 2:
        return None
    try:
        length, j = _read_varint(buf, i + 1)
    except IndexError:
        return None
    return buf[i], length, j


@dataclass(frozen=True)
class Oversized:
    """A PUBLISH larger than the reader's limit, read past: what it takes to acknowledge and report it."""

    topic: bytes
    head: bytes  # its first OVERSIZED_HEAD payload bytes (none after MQTT 5 properties too long to keep)
    mid: int  # packet identifier, 0 for QoS 0
    qos: int
    size: int  # bytes of the whole packet


class Reader:
    """The packets of one connection, fed read by read.

    At most ``max_packet_size`` bytes of an incomplete packet are held, and only once its fixed header has
    shown that it is no larger. A PUBLISH that is larger is never assembled: its bytes are dropped as they
    come in, all but its topic, packet identifier and first payload bytes, and it comes out as
    :class:`Oversized` once its last byte has passed (MQTT 3.1.1 has no way to tell the broker the limit,
    and a broker that ignores MQTT 5's Maximum Packet Size must not make the client hoard memory either).
    Any other packet over the limit, or malformed framing, is a :class:`ProtocolError`.
    """

    def __init__(self, version: int, max_packet_size: int = MAX_PACKET_SIZE) -> None:
        if not MIN_PACKET_SIZE <= max_packet_size <= MAX_PACKET_SIZE:
            raise ValueError(f"max_packet_size must be {MIN_PACKET_SIZE} to {MAX_PACKET_SIZE} bytes")
        self.version = version
        self.max_packet_size = max_packet_size
        self._parts: list[bytes] = []  # the incomplete packet's bytes so far
        self._have = 0
        self._need = 0  # its size; one more than _have while its fixed header is incomplete
        self._skip = 0  # body bytes of the oversized PUBLISH still to come
        self._first = 0  # its first byte, size and remaining length
        self._size = 0
        self._length = 0
        self._head = bytearray()

    @property
    def buffered(self) -> int:
        """Bytes held: of an incomplete packet, or the kept head of an oversized one."""
        return self._have + len(self._head)

    def feed(self, data: bytes) -> tuple[list[Publish], list[Control], list[Oversized]]:
        """The packets ``data`` completes: (PUBLISH packets, other packets, oversized PUBLISH packets)."""
        pubs: list[Publish] = []
        ctrl: list[Control] = []
        over: list[Oversized] = []
        while data:
            if self._skip:
                data = self._drop(data, over)
                continue
            if self._parts:
                self._parts.append(data)
                self._have += len(data)
                if self._have < self._need:
                    break
                data = b"".join(self._parts)
                self._parts = []
                self._have = 0
            p, c, used = split(data, self.version, self.max_packet_size)
            if p:
                pubs = pubs + p if pubs else p
            if c:
                ctrl = ctrl + c if ctrl else c
            data = self._after(data, used) if used < len(data) else b""
        return pubs, ctrl, over

    def _after(self, data: bytes, used: int) -> bytes:
        """What split() left at ``used``: an incomplete packet to keep, or an oversized one whose body
        (from ``data``) is returned to be dropped."""
        header = _header(data, used)
        if header is None:
            self._parts = [data[used:]]
            self._have = len(data) - used
            self._need = self._have + 1
            return b""
        first, length, j = header
        size = j - used + length
        if size <= self.max_packet_size:
            self._parts = [data[used:]]
            self._have = len(data) - used
            self._need = size
            return b""
        if first >> 4 != PUBLISH:
            raise ProtocolError(
                f"packet type {first >> 4} of {size} bytes exceeds the maximum packet size of "
                f"{self.max_packet_size}"
            )
        if (first >> 1) & 3 == 3:
            raise ProtocolError("PUBLISH with QoS 3")
        self._first, self._size, self._length, self._skip = first, size, length, length
        self._head = bytearray()
        return data[j:]

    def _head_wanted(self) -> int:
        """How much of the oversized PUBLISH's body to keep, judging by what is kept so far: topic, packet
        identifier, MQTT 5 properties when short, then OVERSIZED_HEAD bytes of payload."""
        h = self._head
        if len(h) < 2:
            return min(2, self._length)
        p = 2 + ((h[0] << 8) | h[1]) + (2 if self._first & 0x06 else 0)
        if self.version != V5:
            return min(p + OVERSIZED_HEAD, self._length)
        if len(h) <= p:
            return min(p + 1, self._length)
        try:
            n, q = _read_varint(h, p)
        except IndexError:
            return min(len(h) + 1, self._length)
        except ProtocolError:
            return len(h)  # reported by _oversized()
        return min(q + n + OVERSIZED_HEAD if n <= _OVERSIZED_PROPERTIES else q, self._length)

    def _drop(self, data: bytes, over: list[Oversized]) -> bytes:
        """Consume the oversized PUBLISH's bytes in ``data``, keeping its head; the bytes after it."""
        i, n = 0, len(data)
        while i < n and (want := self._head_wanted()) > len(self._head):
            take = min(want - len(self._head), n - i)
            self._head += data[i : i + take]
            i += take
            self._skip -= take
        drop = min(self._skip, n - i)
        i += drop
        self._skip -= drop
        if self._skip:
            return b""
        over.append(self._oversized())
        self._head = bytearray()
        return data[i:]

    def _oversized(self) -> Oversized:
        h = bytes(self._head)
        qos = (self._first >> 1) & 3
        if len(h) < 2:
            raise ProtocolError("PUBLISH shorter than its topic length")
        t_end = 2 + ((h[0] << 8) | h[1])
        p = t_end + (2 if qos else 0)
        if p > len(h):
            raise ProtocolError("PUBLISH shorter than its header")
        mid = (h[t_end] << 8) | h[t_end + 1] if qos else 0
        if self.version == V5:
            try:
                n, q = _read_varint(h, p)
            except IndexError:
                raise ProtocolError("PUBLISH shorter than its header") from None
            if q + n > self._length:
                raise ProtocolError("properties run past the end of the packet")
            if q + n <= len(h):
                props, p = _properties(h, p)
                if _TOPIC_ALIAS in props:
                    raise ProtocolError("PUBLISH with a topic alias")
            else:
                p = len(h)  # properties too long to keep: no payload bytes
        return Oversized(h[2:t_end], h[p : p + OVERSIZED_HEAD], mid, qos, self._size)
