"""A narrow, fast parser for model-server `/metrics` pages (Prometheus text format).

Which samples are read, and into which `EngineMetrics` field, is the per-engine tables in
`engine_metrics.py`; this module compiles them once into a lookup by sample name. Several
series of one sample (one per `model_name` or per data-parallel `engine`) are folded as
the row says: queue and running counts are summed, KV usage takes the maximum (the
fullest engine), info labels (the cache shape) take the largest values, a label list
(`lora_requests_info`) comes from the series with the newest value, histogram `_sum` /
`_count` are summed.

Fast path: the page is bytes; we jump from one `# TYPE` line to the next and only split the
sample lines of wanted families into fields, so the ~300-line histogram-heavy vLLM page
costs a few dozen Python operations. Pages without `# TYPE` lines (or where the fast path
finds nothing) fall back to a scan of every line by prefix.
"""

from __future__ import annotations

import math
import typing
from collections.abc import Callable
from typing import Any

from epp.datalayer.endpoint import EngineMetrics
from epp.datalayer.engine_metrics import (
    ENGINES,
    LOAD_FIELDS,
    MAX,
    SUM,
    Gauge,
    Histogram,
    InfoLabels,
    LabelList,
    Row,
)

# How a sample folds into its accumulator slot.
_OP_SUM, _OP_MAX, _OP_LABELS, _OP_NEWEST = range(4)
# sample name -> ((slot, op, where-label or None, where-value), ...)
_Target = tuple[int, int, str | None, str | None]
_Reader = Callable[[list[Any], dict[str, Any]], None]


def _field_types() -> dict[str, type]:
    hints = typing.get_type_hints(EngineMetrics)
    return {k: typing.get_origin(v) or v for k, v in hints.items()}


def _positive_int(v: float | None) -> int | None:
    if v is None or not math.isfinite(v):
        return None
    i = int(v)
    return i if i > 0 else None


def _int_or_none(s: str | None) -> int | None:
    if not s:
        return None
    try:
        return _positive_int(float(s))
    except ValueError:
        return None


class _Compiled:
    """The engine tables as a sample-name lookup plus per-engine result readers."""

    def __init__(self, engines: dict[str, tuple[Row, ...]]) -> None:
        self.samples: dict[bytes, tuple[_Target, ...]] = {}
        self.families: set[bytes] = set()
        self.readers: list[list[_Reader]] = []
        self.slot_ranges: list[tuple[int, int]] = []
        self.histograms: set[str] = set()
        self.nslots = 0
        types = _field_types()
        for rows in engines.values():
            lo = self.nslots
            self.readers.append([self._compile(row, types) for row in rows])
            self.slot_ranges.append((lo, self.nslots))
        self.order = {
            name: (i, *(j for j in range(len(engines)) if j != i))
            for i, name in enumerate(engines)
        }
        self.default_order = self.order[next(iter(engines))]

    def _slot(self, name: str, op: int, where: tuple[str, str] | None = None) -> int:
        slot = self.nslots
        self.nslots += 1
        key = name.encode()
        target = (slot, op, where[0] if where else None, where[1] if where else None)
        self.samples[key] = (*self.samples.get(key, ()), target)
        self.families.add(key)
        for suffix in (b"_info", b"_total"):  # OpenMetrics family names drop these
            if key.endswith(suffix):
                self.families.add(key[: -len(suffix)])
        return slot

    def _compile(self, row: Row, types: dict[str, type]) -> _Reader:
        def check(field: str, want: type | None = None) -> None:
            if field not in types or (want is not None and types[field] is not want):
                raise TypeError(f"engine metric row {row}: EngineMetrics has no {field!r} "
                                f"field{f' of type {want.__name__}' if want else ''}")

        if isinstance(row, Gauge):
            check(row.field)
            return self._gauge(row, types[row.field] is int)
        if isinstance(row, InfoLabels):
            for field, _ in row.fields:
                check(field, int)
            return self._info(row)
        if isinstance(row, LabelList):
            check(row.field, tuple)
            return self._label_list(row)
        for suffix in ("_sum", "_count", "_recent_ms"):
            check(row.field + suffix, float)
        self.histograms.add(row.field)
        return self._histogram(row)

    def _gauge(self, row: Gauge, integer: bool) -> _Reader:
        if row.fold not in (SUM, MAX):
            raise ValueError(f"engine metric row {row}: fold must be {SUM!r} or {MAX!r}")
        slot = self._slot(row.name, _OP_SUM if row.fold == SUM else _OP_MAX, row.where)
        field, clamp = row.field, row.clamp

        def read(vals: list[Any], out: dict[str, Any]) -> None:
            v = vals[slot]
            if v is None or field in out:
                return
            if integer:
                v = _positive_int(v)
                if v is None:
                    return
            elif clamp is not None:
                v = min(max(v, clamp[0]), clamp[1])
            out[field] = v

        return read

    def _info(self, row: InfoLabels) -> _Reader:
        slot = self._slot(row.name, _OP_LABELS)
        fields = row.fields

        def read(vals: list[Any], out: dict[str, Any]) -> None:
            series = vals[slot]
            if series is None:
                return
            for field, key in fields:
                if field in out:
                    continue
                best: int | None = None
                for raw in series:  # decoded lazily: usually one series per page
                    v = _int_or_none(label(raw, key))
                    if v is not None and (best is None or v > best):
                        best = v
                if best is not None:
                    out[field] = best

        return read

    def _label_list(self, row: LabelList) -> _Reader:
        slot = self._slot(row.name, _OP_NEWEST)
        field, key = row.field, row.label

        def read(vals: list[Any], out: dict[str, Any]) -> None:
            newest = vals[slot]
            if newest is None or field in out:
                return
            text = label(newest[1], key) or ""
            out[field] = tuple(x.strip() for x in text.split(",") if x.strip())

        return read

    def _histogram(self, row: Histogram) -> _Reader:
        s_slot = self._slot(row.name + "_sum", _OP_SUM)
        c_slot = self._slot(row.name + "_count", _OP_SUM)
        self.families.add(row.name.encode())  # the `# TYPE` line names the histogram
        sum_key, count_key = row.field + "_sum", row.field + "_count"

        def read(vals: list[Any], out: dict[str, Any]) -> None:
            s, c = vals[s_slot], vals[c_slot]
            if s is None or c is None or count_key in out:
                return
            out[sum_key], out[count_key] = s, c

        return read


_C = _Compiled(ENGINES)
_SAMPLES = _C.samples
_FAMILIES = frozenset(_C.families)
_PREFIXES = tuple(_SAMPLES)  # cheap C-level pre-filter for the line scan
HISTOGRAM_FIELDS = frozenset(_C.histograms)


class ParsedMetrics:
    """What a page said: `EngineMetrics` field -> value, only for signals the page carried
    (histograms as `<field>_sum` and `<field>_count`). Attribute access reads a field or
    None."""

    __slots__ = ("values",)

    def __init__(self, values: dict[str, Any] | None = None) -> None:
        self.values: dict[str, Any] = values if values is not None else {}

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return self.values.get(name)

    @property
    def empty(self) -> bool:
        return not any(f in self.values for f in LOAD_FIELDS)

    def __repr__(self) -> str:
        return f"ParsedMetrics({self.values!r})"


class _Acc:
    """Per-slot accumulators, folded as each slot's op says."""

    __slots__ = ("found", "vals")

    def __init__(self) -> None:
        self.vals: list[Any] = [None] * _C.nslots
        self.found = 0

    def add(self, targets: tuple[_Target, ...], labels: bytes | None, value: float) -> None:
        vals = self.vals
        for slot, op, wkey, wval in targets:
            if wkey is not None and (labels is None or label(labels, wkey) != wval):
                continue
            self.found += 1
            cur = vals[slot]
            if op == _OP_SUM:
                vals[slot] = value if cur is None else cur + value
            elif op == _OP_MAX:
                if cur is None or value > cur:
                    vals[slot] = value
            elif op == _OP_LABELS:
                if cur is None:
                    vals[slot] = [labels or b""]
                else:
                    cur.append(labels or b"")
            elif cur is None or cur[0] < value:  # _OP_NEWEST
                vals[slot] = (value, labels or b"")

    def result(self, order: tuple[int, ...]) -> ParsedMetrics:
        vals = self.vals
        out: dict[str, Any] = {}
        for e in order:
            lo, hi = _C.slot_ranges[e]
            if vals[lo:hi].count(None) == hi - lo:  # nothing of this engine on the page
                continue
            for read in _C.readers[e]:
                read(vals, out)
        return ParsedMetrics(out)


def _sample(acc: _Acc, line: bytes) -> None:
    """Handle one sample line if its metric name is wanted."""
    brace = line.find(b"{")
    space = line.find(b" ")
    if brace != -1 and (space == -1 or brace < space):
        ent = _SAMPLES.get(line[:brace])
        if ent is None:
            return
        close = line.rfind(b"}")
        if close < brace:
            return
        labels: bytes | None = line[brace + 1 : close]
        rest = line[close + 1 :]
    else:
        if space == -1:
            return
        ent = _SAMPLES.get(line[:space])
        if ent is None:
            return
        labels = None
        rest = line[space + 1 :]
    fields = rest.split()
    if not fields:
        return
    try:
        value = float(fields[0])
    except ValueError:
        return
    if not math.isfinite(value):
        return
    acc.add(ent, labels, value)


def _scan_by_type(data: bytes, acc: _Acc) -> bool:
    """Jump between `# TYPE` lines; parse only wanted families. False if no TYPE line."""
    pos = 0
    n = len(data)
    seen_type = False
    find = data.find
    while True:
        i = find(b"# TYPE ", pos)
        if i < 0:
            return seen_type
        if i and data[i - 1] != 10:  # not at a line start (e.g. inside HELP text)
            pos = i + 7
            continue
        seen_type = True
        name_end = find(b" ", i + 7)
        eol = find(b"\n", i + 7)
        if eol < 0:
            return seen_type
        if name_end < 0 or name_end > eol:
            name_end = eol
        pos = eol + 1
        if data[i + 7 : name_end] not in _FAMILIES:
            continue
        while pos < n and data[pos] != 35:  # until the next comment line ('#')
            eol = find(b"\n", pos)
            if eol < 0:
                eol = n
            if eol > pos:
                _sample(acc, data[pos:eol])
            pos = eol + 1


def _scan_lines(data: bytes, acc: _Acc) -> None:
    for line in data.split(b"\n"):
        if line.startswith(_PREFIXES):
            _sample(acc, line.rstrip(b"\r"))


def parse_metrics(data: bytes, prefer: str = "vllm") -> ParsedMetrics:
    """Parse a `/metrics` page. `prefer` is the endpoint's engine (a key of `ENGINES`)."""
    acc = _Acc()
    if not _scan_by_type(data, acc) or acc.found == 0:
        acc = _Acc()
        _scan_lines(data, acc)
    return acc.result(_C.order.get(prefer, _C.default_order))


def label(raw: bytes, key: str) -> str | None:
    """The value of one label in a raw `a="x",b="y"` label set (without parsing the rest)."""
    needle = key.encode() + b'="'
    start = 0
    while True:
        i = raw.find(needle, start)
        if i < 0:
            return None
        if i == 0 or raw[i - 1] in b", \t":
            break
        start = i + 1  # matched the tail of a longer key, or text inside a value
    j = i + len(needle)
    q = raw.find(b'"', j)
    if q < 0:
        return None
    if raw.find(b"\\", j, q) < 0:
        return raw[j:q].decode("utf-8", "replace")
    return parse_labels(raw.decode("utf-8", "replace")).get(key)  # escapes: the slow way


def parse_labels(s: str) -> dict[str, str]:
    """`a="x",b="y\\"z"` -> {"a": "x", "b": 'y"z'} (Prometheus text escaping)."""
    out: dict[str, str] = {}
    i, n = 0, len(s)
    while i < n:
        eq = s.find('="', i)
        if eq < 0:
            break
        key = s[i:eq].strip(" ,\t")
        j = eq + 2
        escaped = False
        while True:
            q = s.find('"', j)
            if q < 0:
                return out  # unterminated value: keep what we have
            k = q - 1
            while k >= eq + 2 and s[k] == "\\":
                k -= 1
            if (q - 1 - k) % 2 == 0:
                break
            escaped = True
            j = q + 1
        raw = s[eq + 2 : q]
        if escaped or "\\" in raw:
            raw = _unescape(raw)
        out[key] = raw
        i = q + 1
    return out


def _unescape(raw: str) -> str:
    out: list[str] = []
    it = iter(raw)
    for ch in it:
        if ch == "\\":
            nxt = next(it, "")
            out.append("\n" if nxt == "n" else nxt)
        else:
            out.append(ch)
    return "".join(out)
