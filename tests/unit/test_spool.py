"""The on-disk spool: append, confirm, cursor, recovery after a crash, bounds and expiry."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from connectors.common.spool import MIB, Spool, SpoolConfig, SpoolFull, SpoolSetting, spool_dir
from pipeline.core.topology import Model


def _value(i: int, size: int = 100) -> bytes:
    return f"{i:08d}".encode() * (size // 8)


def _fill(sp: Spool, n: int, size: int = 100, weight: int = 3) -> list[int]:
    return [
        sp.append(f"site/dev{i % 3}".encode(), _value(i, size), 1_700_000_000_000 + i, weight)
        for i in range(n)
    ]


def _seqs(sp: Spool) -> list[int]:
    return [r.seq for r in sp.read(0, 1_000_000, 1 << 40)]


def test_append_read_confirm_and_reopen(tmp_path: Path) -> None:
    sp = Spool(tmp_path, max_bytes=16 * MIB, segment_bytes=4096)
    seqs = _fill(sp, 100)
    assert seqs == list(range(100))
    recs = sp.read(0, 1000)
    assert [r.seq for r in recs] == seqs
    assert recs[7].key == b"site/dev1" and recs[7].value == _value(7) and recs[7].ts_ms == 1_700_000_000_007
    assert recs[7].weight == 3
    for s in range(40):
        sp.confirm(s)
    assert sp.cursor == 40 and sp.pending == 60
    assert _seqs(sp)[0] == 40
    # Delivered segments are gone: none left wholly below the cursor.
    firsts = sorted(int(p.name[4:24]) for p in tmp_path.glob("seg-*.log"))
    assert firsts[0] <= 40 < (firsts[1] if len(firsts) > 1 else 10**9)
    sp.close()
    again = Spool(tmp_path, max_bytes=16 * MIB, segment_bytes=4096)
    assert again.cursor == 40 and again.stats.replayed == 60
    assert _seqs(again) == list(range(40, 100))
    assert again.append(b"k", b"v", None) == 100  # seqs continue
    again.close()


def test_out_of_order_confirms_move_the_cursor_only_over_contiguous_records(tmp_path: Path) -> None:
    sp = Spool(tmp_path, max_bytes=16 * MIB)
    _fill(sp, 10)
    for s in (3, 1, 2, 5):
        sp.confirm(s)
    assert sp.cursor == 0
    sp.confirm(0)
    assert sp.cursor == 4  # 0..3 contiguous; 5 waits for 4
    assert sp.is_confirmed(5) and not sp.is_confirmed(4)
    sp.confirm(4)
    assert sp.cursor == 6
    assert _seqs(sp) == [6, 7, 8, 9]
    sp.close()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(order=st.permutations(list(range(30))), cut=st.integers(0, 30))
def test_any_confirmation_order(tmp_path_factory: pytest.TempPathFactory, order: list[int], cut: int) -> None:
    """Whatever order the reports come in, the cursor is the lowest unconfirmed record, and a reopen
    replays exactly the records not confirmed before the cursor (plus confirmed ones above it)."""
    d = tmp_path_factory.mktemp("spool")
    sp = Spool(d, max_bytes=16 * MIB, segment_bytes=1024)
    _fill(sp, 30)
    done = set(order[:cut])
    for s in order[:cut]:
        sp.confirm(s)
    lowest = min(set(range(30)) - done, default=30)
    assert sp.cursor == lowest
    assert sp.pending == 30 - len(done)
    sp.close()
    again = Spool(d, max_bytes=16 * MIB, segment_bytes=1024)
    assert _seqs(again) == list(range(lowest, 30))
    again.close()


def test_torn_tail_is_cut_and_the_rest_replayed(tmp_path: Path) -> None:
    sp = Spool(tmp_path, max_bytes=16 * MIB)
    _fill(sp, 20, size=200)
    for s in range(5):
        sp.confirm(s)
    sp.sync()
    # A crash: no close. The last record is half written.
    seg = max(tmp_path.glob("seg-*.log"))
    size = seg.stat().st_size
    with open(seg, "r+b") as f:
        f.truncate(size - 50)
    again = Spool(tmp_path, max_bytes=16 * MIB)
    assert again.stats.truncated_bytes > 0
    assert _seqs(again) == list(range(5, 19))  # record 19 was torn
    assert again.append(b"k", b"new", None) == 19
    assert _seqs(again)[-1] == 19 and again.read(19)[0].value == b"new"
    again.close()


def test_corrupt_record_is_detected_by_crc(tmp_path: Path) -> None:
    sp = Spool(tmp_path, max_bytes=16 * MIB)
    _fill(sp, 10, size=200)
    sp.close()
    seg = max(tmp_path.glob("seg-*.log"))
    data = bytearray(seg.read_bytes())
    frame = len(data) // 10
    data[7 * frame + 40] ^= 0xFF  # flip a byte inside record 7
    seg.write_bytes(bytes(data))
    again = Spool(tmp_path, max_bytes=16 * MIB)
    assert _seqs(again) == list(range(7))
    again.close()


def test_damaged_cursor_replays_everything_kept(tmp_path: Path) -> None:
    sp = Spool(tmp_path, max_bytes=16 * MIB)
    _fill(sp, 5)
    sp.confirm(0)
    sp.close()
    (tmp_path / "cursor").write_bytes(b"garbage")
    again = Spool(tmp_path, max_bytes=16 * MIB)
    assert _seqs(again) == list(range(5))
    again.close()


def test_block_refuses_past_max_bytes(tmp_path: Path) -> None:
    sp = Spool(tmp_path, max_bytes=64 * 1024, when_full="block", segment_bytes=16 * 1024)
    n = 0
    with pytest.raises(SpoolFull):
        while True:
            sp.append(b"k", _value(n, 1000), None)
            n += 1
    assert sp.size <= 64 * 1024
    assert not sp.fits(1000)
    assert sp.stats.dropped == 0
    # Confirming lets whole segments go, and there is room again.
    for s in range(n):
        sp.confirm(s)
    assert sp.fits(1000)
    sp.append(b"k", b"v", None)
    assert sum(p.stat().st_size for p in tmp_path.glob("seg-*.log")) <= 64 * 1024
    sp.close()


def test_drop_oldest_counts_readings_and_keeps_the_newest(tmp_path: Path) -> None:
    sp = Spool(tmp_path, max_bytes=64 * 1024, when_full="drop_oldest", segment_bytes=16 * 1024)
    seqs = _fill(sp, 300, size=1000, weight=5)
    assert sum(p.stat().st_size for p in tmp_path.glob("seg-*.log")) <= 64 * 1024
    kept = _seqs(sp)
    assert kept == list(range(kept[0], 300)) and kept[0] > 0
    assert sp.cursor == kept[0]
    assert sp.stats.dropped == 5 * kept[0]  # every record below the kept ones, in readings
    assert sp.counters()["spool_dropped"] == 5 * kept[0]
    assert seqs[-1] == 299
    sp.close()


def test_drop_oldest_does_not_count_confirmed_records(tmp_path: Path) -> None:
    sp = Spool(tmp_path, max_bytes=64 * 1024, when_full="drop_oldest", segment_bytes=16 * 1024)
    _fill(sp, 40, size=1000, weight=2)
    for s in range(0, 40, 2):
        sp.confirm(s)  # every other one: the cursor stays at 1
    _fill(sp, 60, size=1000, weight=2)
    kept_from = sp.cursor
    # Of the records dropped, only the unconfirmed (odd ones below 40, and all from 40 on) count.
    unconfirmed = [s for s in range(kept_from) if s >= 40 or s % 2]
    assert sp.stats.dropped == 2 * len(unconfirmed)
    sp.close()


def test_age_expiry(tmp_path: Path) -> None:
    now = [1_000_000]
    sp = Spool(tmp_path, max_bytes=16 * MIB, max_age_ms=60_000, segment_bytes=2048, clock_ms=lambda: now[0])
    _fill(sp, 30, weight=4)
    now[0] += 30_000
    _fill(sp, 10, weight=4)
    assert sp.expire() == 0
    now[0] += 45_000  # the first 30 are 75 s old, the last 10 are 45 s old
    dropped = sp.expire()
    kept = _seqs(sp)
    assert kept[-1] == 39 and 0 < kept[0] <= 30  # whole segments go; a mixed one waits for the sender
    assert dropped == 4 * kept[0]
    # Per record (what the sender does with a record in a segment that is not wholly old):
    for r in sp.read(0):
        if sp.too_old(r):
            sp.drop_record(r, "old")
    assert _seqs(sp) == list(range(30, 40))
    assert sp.stats.dropped == 4 * 30
    sp.close()


def test_counters(tmp_path: Path) -> None:
    now = [5_000_000]
    sp = Spool(tmp_path, max_bytes=16 * MIB, clock_ms=lambda: now[0])
    assert sp.counters() == {
        "spool_bytes": 0,
        "spool_records": 0,
        "spool_oldest_age_s": 0.0,
        "spool_dropped": 0,
    }
    _fill(sp, 3)
    now[0] += 2500
    c = sp.counters()
    assert c["spool_records"] == 3 and c["spool_oldest_age_s"] == 2.5 and int(c["spool_bytes"]) > 300
    sp.close()


def test_sync_writes_the_cursor_durably(tmp_path: Path) -> None:
    sp = Spool(tmp_path, max_bytes=16 * MIB)
    _fill(sp, 4)
    sp.confirm(0)
    sp.confirm(1)
    assert sp.sync() == 4
    # A crash after sync (no close): the reopened spool starts at the synced cursor.
    fresh = Spool(tmp_path, max_bytes=16 * MIB)
    assert fresh.cursor == 2 and _seqs(fresh) == [2, 3]
    fresh.close()
    sp.close()


class _Src(Model):
    spool: SpoolSetting = SpoolConfig()


def test_config_forms(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert _Src.model_validate({"spool": False}).spool is None
    assert _Src.model_validate({"spool": "off"}).spool is None
    assert _Src.model_validate({"spool": "on"}).spool == SpoolConfig()
    s = _Src.model_validate(
        {"spool": {"max_bytes": 32 * MIB, "max_age": "2h", "when_full": "drop_oldest"}}
    ).spool
    assert s is not None and s.max_age == 7_200_000 and s.when_full == "drop_oldest"
    with pytest.raises(ValidationError, match="max_bytes"):
        _Src.model_validate({"spool": {"max_bytes": 1000}})
    with pytest.raises(ValidationError, match="when_full"):
        _Src.model_validate({"spool": {"when_full": "wait"}})
    with pytest.raises(ValidationError, match="expected 'off', 'on'"):
        _Src.model_validate({"spool": "maybe"})
    monkeypatch.setenv("PLANTSTREAM_LOCAL_DIR", str(tmp_path))
    assert spool_dir(SpoolConfig(), "demo", "src") == tmp_path.resolve() / "spool" / "demo" / "src"
    assert spool_dir(SpoolConfig(dir=tmp_path / "x"), "demo", "src") == tmp_path / "x"
