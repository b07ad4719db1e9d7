"""KV events that say a pod's cache is gone drop the prefix index's guesses for it."""

from __future__ import annotations

from epp.datalayer.endpoint import Endpoint
from epp.datalayer.kv_events import AllBlocksCleared, BlockRemoved
from epp.requestcontrol.kv_sync import PrefixIndexKVSync
from epp.scheduling.prefix_index import PrefixIndex


def test_cache_cleared_and_publisher_restart_reset_only_that_pod() -> None:
    index = PrefixIndex()
    a, b = Endpoint("127.0.0.2", 8000), Endpoint("127.0.0.3", 8000)
    hashes = index.hash_prompt("m", b"x" * 2048)
    index.insert(a, hashes)
    index.insert(b, hashes)
    seen: list[str] = []
    sync = PrefixIndexKVSync(index, on_reset=seen.append)
    sync.on_event(a.key, BlockRemoved((1, 2)))  # block-level events are not mapped
    sync.on_gap(a.key, 5)  # lost messages: the cache is still there
    assert index.match(hashes) == {a.key: len(hashes), b.key: len(hashes)}
    sync.on_event(a.key, AllBlocksCleared())
    assert index.match(hashes) == {b.key: len(hashes)}
    sync.on_gap(b.key, -1)  # publisher restarted
    assert index.match(hashes) == {}
    assert seen == [a.key, b.key] and sync.resets == 2
