"""A narrow, fast parser for model-server `/metrics` pages (Prometheus text format).

Only the handful of samples the EPP uses are looked at (REFERENCE.md §3):

- waiting:  `vllm:num_requests_waiting`  | `sglang:num_queue_reqs`
- running:  `vllm:num_requests_running`  | `sglang:num_running_reqs`
- KV usage: `vllm:kv_cache_usage_perc` (older `vllm:gpu_cache_usage_perc`) | `sglang:token_usage`
- cache:    `vllm:cache_config_info{block_size,num_gpu_blocks}`
            | `sglang:cache_config_info{page_size,num_pages}`
- LoRA:     `vllm:lora_requests_info{running_lora_adapters,...}` (value = timestamp)
- TPOT:     `vllm:inter_token_latency_seconds` (older `vllm:time_per_output_token_seconds`)
            histogram `_sum` / `_count`, summed over series (the scraper turns deltas of
            these into a recent mean: how fast this engine really decodes)

Both families are read whatever the engine; `prefer` picks the family when a page has both.
Several series of one sample (one per `model_name` or per data-parallel `engine`) are
combined: queue and running counts are summed, KV usage takes the maximum (the fullest
engine), the cache shape takes the largest values, and for `lora_requests_info` the series
with the newest timestamp value wins (vLLM leaves old label sets on the page).

Fast path: the page is bytes; we jump from one `# TYPE` line to the next and only split the
sample lines of wanted families into fields, so the ~300-line histogram-heavy vLLM page
costs a few dozen Python operations. Pages without `# TYPE` lines (or where the fast path
finds nothing) fall back to a scan of every line by prefix.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# signal slots
_WAITING, _RUNNING, _KV, _KV_OLD, _CACHE, _LORA, _ITL_SUM, _ITL_COUNT, _TPOT_SUM, _TPOT_COUNT = (
    range(10)
)
_NSLOTS = 10
_SUMMED = frozenset({_WAITING, _RUNNING, _ITL_SUM, _ITL_COUNT, _TPOT_SUM, _TPOT_COUNT})
VLLM, SGLANG = 0, 1

_SAMPLES: dict[bytes, tuple[int, int]] = {
    b"vllm:num_requests_waiting": (VLLM, _WAITING),
    b"vllm:num_requests_running": (VLLM, _RUNNING),
    b"vllm:kv_cache_usage_perc": (VLLM, _KV),
    b"vllm:gpu_cache_usage_perc": (VLLM, _KV_OLD),
    b"vllm:cache_config_info": (VLLM, _CACHE),
    b"vllm:lora_requests_info": (VLLM, _LORA),
    b"sglang:num_queue_reqs": (SGLANG, _WAITING),
    b"sglang:num_running_reqs": (SGLANG, _RUNNING),
    b"sglang:token_usage": (SGLANG, _KV),
    b"sglang:cache_config_info": (SGLANG, _CACHE),
    b"vllm:inter_token_latency_seconds_sum": (VLLM, _ITL_SUM),
    b"vllm:inter_token_latency_seconds_count": (VLLM, _ITL_COUNT),
    b"vllm:time_per_output_token_seconds_sum": (VLLM, _TPOT_SUM),
    b"vllm:time_per_output_token_seconds_count": (VLLM, _TPOT_COUNT),
}
_HISTOGRAMS = (b"vllm:inter_token_latency_seconds", b"vllm:time_per_output_token_seconds")
# `# TYPE` family names that hold wanted samples (an OpenMetrics `info` family drops `_info`).
_FAMILIES = frozenset(
    list(_SAMPLES)
    + [n[: -len(b"_info")] for n in _SAMPLES if n.endswith(b"_info")]
    + list(_HISTOGRAMS)
)
_PREFIXES = tuple(_SAMPLES)  # cheap C-level pre-filter for the line scan
_CACHE_LABELS = {VLLM: ("block_size", "num_gpu_blocks"), SGLANG: ("page_size", "num_pages")}


@dataclass(slots=True)
class ParsedMetrics:
    """What a page said; None = the page did not carry that signal."""

    waiting: float | None = None
    running: float | None = None
    kv_usage: float | None = None  # 0..1
    block_size: int | None = None
    num_blocks: int | None = None
    running_loras: tuple[str, ...] | None = None
    tpot_sum: float | None = None  # cumulative seconds over all decoded tokens
    tpot_count: float | None = None

    @property
    def empty(self) -> bool:
        return self.waiting is None and self.running is None and self.kv_usage is None


class _Acc:
    """Per-family accumulators, combined as described in the module docstring."""

    __slots__ = ("found", "vals")

    def __init__(self) -> None:
        self.vals: list[list[object]] = [[None] * _NSLOTS, [None] * _NSLOTS]
        self.found = 0

    def add(self, fam: int, slot: int, labels: bytes | None, value: float) -> None:
        self.found += 1
        v = self.vals[fam]
        cur = v[slot]
        if slot in _SUMMED:
            v[slot] = value if cur is None else cur + value  # type: ignore[operator]
        elif slot <= _KV_OLD:
            if cur is None or value > cur:  # type: ignore[operator]
                v[slot] = value
        elif slot == _CACHE:
            # Label sets are decoded lazily in `result` (usually one series per page).
            if cur is None:
                v[slot] = [labels or b""]
            else:
                cur.append(labels or b"")  # type: ignore[attr-defined]
        elif cur is None or cur[0] < value:  # type: ignore[index]
            v[slot] = (value, labels or b"")  # _LORA: the newest series wins

    def result(self, prefer: int) -> ParsedMetrics:
        first, second = self.vals[prefer], self.vals[1 - prefer]

        def pick(slot: int) -> object:
            x = first[slot]
            return second[slot] if x is None else x

        out = ParsedMetrics()
        w, r = pick(_WAITING), pick(_RUNNING)
        out.waiting = w if isinstance(w, float) else None
        out.running = r if isinstance(r, float) else None
        kv = first[_KV]
        if kv is None:
            kv = first[_KV_OLD]
        if kv is None:
            kv = second[_KV] if second[_KV] is not None else second[_KV_OLD]
        if isinstance(kv, float):
            out.kv_usage = min(max(kv, 0.0), 1.0)
        fam = prefer if first[_CACHE] is not None else 1 - prefer
        cache = self.vals[fam][_CACHE]
        if isinstance(cache, list):
            bkey, nkey = _CACHE_LABELS[fam]
            for raw in cache:
                out.block_size = _max_opt(out.block_size, _int_or_none(label(raw, bkey)))
                out.num_blocks = _max_opt(out.num_blocks, _int_or_none(label(raw, nkey)))
        isum, icount = first[_ITL_SUM], first[_ITL_COUNT]
        if not isinstance(icount, float):
            isum, icount = first[_TPOT_SUM], first[_TPOT_COUNT]
        if isinstance(isum, float) and isinstance(icount, float):
            out.tpot_sum, out.tpot_count = isum, icount
        lora = pick(_LORA)
        if isinstance(lora, tuple):
            running = label(lora[1], "running_lora_adapters") or ""
            out.running_loras = tuple(x.strip() for x in running.split(",") if x.strip())
        return out


def _int_or_none(s: str | None) -> int | None:
    if not s:
        return None
    try:
        v = int(float(s))
    except (ValueError, OverflowError):
        return None
    return v if v > 0 else None


def _max_opt(a: int | None, b: int | None) -> int | None:
    if a is None:
        return b
    if b is None:
        return a
    return max(a, b)


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
    acc.add(ent[0], ent[1], labels, value)


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
    """Parse a `/metrics` page. `prefer` is the endpoint's engine (`vllm`, `sglang`, ...)."""
    acc = _Acc()
    if not _scan_by_type(data, acc) or acc.found == 0:
        acc = _Acc()
        _scan_lines(data, acc)
    return acc.result(SGLANG if prefer == "sglang" else VLLM)


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
