"""Keyed state for a stage, made durable to a compacted topic at the stage's checkpoints.

:class:`PartitionedStore` is a ``MutableMapping`` (what :class:`pipeline.stages.loops.engine.LoopEngine`
keeps its state in) whose every write is logged under the input partition being processed, serialised
when it is made. At a checkpoint the runtime produces a partition's log, in order, to the same partition
of the state topic; a deletion is a tombstone. A checkpoint cut short by a crash therefore leaves a prefix
of the writes, never a later write without an earlier one, and the records carry the input offsets that
make the replay idempotent. When a partition is assigned its records are read back in order.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, MutableMapping
from typing import Any

from pipeline.core import codec


class PartitionedStore(MutableMapping[str, Any]):
    def __init__(self) -> None:
        self._data: dict[str, Any] = {}
        self._owner: dict[str, int] = {}
        self._log: dict[int, list[tuple[bytes, bytes | None]]] = {}
        self.partition = 0  # the input partition whose message is being processed

    def __getitem__(self, key: str) -> Any:
        return self._data[key]

    def __setitem__(self, key: str, value: Any) -> None:
        p = self.partition
        self._data[key] = value
        self._owner[key] = p
        self._log.setdefault(p, []).append((key.encode(), codec.dumps(value)))

    def __delitem__(self, key: str) -> None:
        del self._data[key]
        p = self._owner.pop(key, self.partition)
        self._log.setdefault(p, []).append((key.encode(), None))

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def take_log(self, partition: int) -> list[tuple[bytes, bytes | None]]:
        """The writes of ``partition`` since the last call, in the order they were made."""
        return self._log.pop(partition, [])

    def load(self, partition: int, records: Iterable[tuple[bytes | None, bytes | None]]) -> int:
        """Apply a partition's state records in topic order; returns the number of keys it holds."""
        for key, value in records:
            if key is None:
                continue
            k = key.decode()
            if value is None:
                self._data.pop(k, None)
                self._owner.pop(k, None)
            else:
                self._data[k] = codec.loads(value)
                self._owner[k] = partition
        return sum(1 for p in self._owner.values() if p == partition)

    def drop(self, partition: int) -> None:
        """Forget a partition that went to another worker (its state was made durable first, or is lost)."""
        for k in [k for k, p in self._owner.items() if p == partition]:
            del self._data[k]
            del self._owner[k]
        self._log.pop(partition, None)
