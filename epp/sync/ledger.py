"""This instance's own contribution to the shared view, and what changed since the last flush.

The replica-sync lifecycle hook charges and releases the same counters as in-flight
accounting, but into the ledger (`counters(ep)`), and hands it the prompt blocks it sent
and the prefill work it queued (`add_prefill_charge`);
flow control reports its queue depths with `set_queue`. The sync node turns the ledger into
batches: `take_delta()` (only what changed, with absolute values) and `snapshot()` (every
non-zero entry). Nothing here does I/O; it runs on the event loop thread.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from epp.datalayer.endpoint import Endpoint, InFlight

# The InFlight fields shared between instances, in protocol order (sync.proto EndpointLoad).
LOAD_FIELDS: tuple[str, ...] = (
    "requests",
    "tokens",
    "prefill_requests",
    "prefill_tokens",
    "pending_requests",
    "pending_prefill_tokens",
)
Load = tuple[int, int, int, int, int, int]
ZERO_LOAD: Load = (0, 0, 0, 0, 0, 0)
QueueKey = tuple[int, str]  # (priority band, flow)
TransitKey = tuple[str, int]  # (endpoint, first block in transit)


def load_of(inf: InFlight) -> Load:
    return (
        inf.requests,
        inf.tokens,
        inf.prefill_requests,
        inf.prefill_tokens,
        inf.pending_requests,
        inf.pending_prefill_tokens,
    )


class LocalLedger:
    def __init__(self, max_pending_prefix: int = 8192) -> None:
        self.loads: dict[str, InFlight] = {}
        self.queues: dict[QueueKey, tuple[int, int]] = {}  # -> (requests, bytes)
        self._dirty: set[str] = set()
        self._dirty_queues: set[QueueKey] = set()
        self.transit: dict[TransitKey, int] = {}  # P/D transfers not landed yet
        self._dirty_transit: set[TransitKey] = set()
        self._prefix: list[tuple[str, list[int]]] = []
        self._charges: dict[str, int] = {}  # endpoint -> prefill tokens queued since the take
        self._precise: list[tuple[str, list[int]]] = []  # precise index speculations
        self.max_pending_prefix = max_pending_prefix
        self.dropped_prefix = 0  # inserts not shared because no flush came in time
        # Called when the ledger goes from clean to dirty (the node schedules a flush).
        self.on_dirty: Callable[[], None] | None = None

    @property
    def dirty(self) -> bool:
        return bool(
            self._dirty
            or self._dirty_queues
            or self._dirty_transit
            or self._prefix
            or self._charges
            or self._precise
        )

    def _mark(self) -> None:
        if self.on_dirty is not None and not self.dirty:
            self.on_dirty()

    # ---- writes (request path) ---------------------------------------------------------
    def counters(self, ep: Endpoint) -> InFlight:
        """The ledger's counters for `ep`, to be changed by the caller (marked changed)."""
        key = ep.key
        if key not in self._dirty:
            self._mark()
            self._dirty.add(key)
        inf = self.loads.get(key)
        if inf is None:
            inf = self.loads[key] = InFlight()
        return inf

    def add_prefix(self, ep: Endpoint, hashes: list[int]) -> None:
        self._add_blocks(self._prefix, ep.key, hashes)

    def add_precise(self, key: str, hashes: list[int]) -> None:
        """Blocks this instance's pick speculated on `key` in its precise prefix index (the
        index's `on_speculate` listener)."""
        self._add_blocks(self._precise, key, hashes)

    def _add_blocks(self, pending: list[tuple[str, list[int]]], key: str, hashes: list[int]) -> None:
        if not hashes:
            return
        if len(pending) >= self.max_pending_prefix:
            self.dropped_prefix += 1
            return
        self._mark()
        pending.append((key, hashes))

    def add_prefill_charge(self, ep: Endpoint, tokens: int) -> None:
        """This instance queued `tokens` uncached prompt tokens on `ep` (its fluid prefill
        queue model was charged): the peers charge theirs too."""
        if tokens <= 0:
            return
        self._mark()
        key = ep.key
        self._charges[key] = self._charges.get(key, 0) + tokens

    def take_precise(self) -> list[tuple[str, list[int]]]:
        """Precise speculations since the last take, then forget them."""
        out, self._precise = self._precise, []
        return out

    def take_prefill_charges(self) -> list[tuple[str, int]]:
        """Prefill charges since the last take, summed per endpoint, then forget them."""
        out = list(self._charges.items())
        self._charges = {}
        return out

    def set_queue(self, band: int, flow: str, requests: int, size_bytes: int = 0) -> None:
        key = (band, flow)
        value = (requests, size_bytes)
        if self.queues.get(key, (0, 0)) == value:
            return
        self._mark()
        if value == (0, 0):
            self.queues.pop(key, None)
        else:
            self.queues[key] = value
        self._dirty_queues.add(key)

    def set_transit(self, key: str, first: int, requests: int) -> None:
        """This instance's transfers to `key` starting at block `first` (the prefix
        index's `on_transit` listener)."""
        tkey = (key, first)
        if self.transit.get(tkey, 0) == requests:
            return
        self._mark()
        if requests:
            self.transit[tkey] = requests
        else:
            self.transit.pop(tkey, None)
        self._dirty_transit.add(tkey)

    def take_transit(self) -> list[tuple[TransitKey, int]]:
        """Transfers changed since the last take (absolute counts), then forget them."""
        out = [(k, self.transit.get(k, 0)) for k in self._dirty_transit]
        self._dirty_transit = set()
        return out

    def sync_queues(self, sizes: Mapping[QueueKey, int]) -> None:
        """Make the shared queue depths those of `sizes` ((band, flow) -> requests)."""
        for key in [k for k in self.queues if k not in sizes]:
            self.set_queue(key[0], key[1], 0)
        for (band, flow), n in sizes.items():
            self.set_queue(band, flow, n)

    # ---- reads (sync node) -------------------------------------------------------------
    def take_delta(
        self,
    ) -> tuple[
        list[tuple[str, Load]], list[tuple[str, list[int]]], list[tuple[QueueKey, tuple[int, int]]]
    ]:
        """What changed since the last take (absolute values), then forget it."""
        loads = []
        for key in self._dirty:
            inf = self.loads.get(key)
            value = load_of(inf) if inf is not None else ZERO_LOAD
            loads.append((key, value))
            if value == ZERO_LOAD:
                self.loads.pop(key, None)  # keep the ledger as small as the live load
        queues = [(k, self.queues.get(k, (0, 0))) for k in self._dirty_queues]
        prefix = self._prefix
        self._dirty = set()
        self._dirty_queues = set()
        self._prefix = []
        return loads, prefix, queues

    def snapshot(self) -> tuple[list[tuple[str, Load]], list[tuple[QueueKey, tuple[int, int]]]]:
        """Every non-zero entry (callers take the delta first, so nothing is pending)."""
        loads = [(k, load_of(inf)) for k, inf in self.loads.items()]
        return [(k, v) for k, v in loads if v != ZERO_LOAD], list(self.queues.items())
