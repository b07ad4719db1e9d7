"""Standalone endpoint discovery: a YAML file (reloaded when it changes) and/or flags.

Endpoints file format (see also docs/standalone.md). The document is either a list of
entries or a mapping with one key, `endpoints`, holding that list::

    endpoints:
      - address: 127.0.0.2          # required, an IP literal (Envoy routes on ip:port)
        port: 8000                  # one target port ...
        name: pod-a                 # optional; defaults to "address:port"
        namespace: default          # optional
        labels:                     # optional; merged over the --endpoint label defaults
          model: m                  # model served ("" / absent = any model)
          business: prod            # absent = "unassigned"
          role: decode              # prefill | decode | both (also llm-d.ai/role)
          engine-type: vllm         # vllm | sglang | trtllm | sim (metric names to scrape)
        ready: true                 # optional, default true
        metricsPort: 8000           # optional, default = the target port
      - address: 127.0.0.3
        ports: [8000, 8001]         # ... or several: one endpoint per port

Unknown keys are errors (a typo must not silently drop a label). The file is polled every
`poll_interval` seconds (stat: mtime, size, inode; plus a periodic content hash for
file systems with coarse mtimes). A changed file is re-read once it has been stable for a
short settle time; a file that fails to parse (or is empty or missing) keeps the last
good view and logs one clear error per bad version.

Flag endpoints are strings `ip:port` or `ip:port1,port2` (IPv6 as `[::1]:8000`); they get
`default_labels`. File entries with the same `ip:port` override flag entries.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ipaddress
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import yaml

from epp.api.errors import UserError
from epp.datalayer.datastore import Datastore
from epp.datalayer.endpoint import Endpoint, format_hostport
from epp.datalayer.labels import DEFAULT_LABEL_KEYS, LabelKeys, endpoint_from_labels

log = logging.getLogger(__name__)

SOURCE_NAME = "static"
_ENTRY_KEYS = frozenset(
    {"address", "port", "ports", "name", "namespace", "labels", "ready", "metricsPort"}
)
_REHASH_EVERY = 5  # polls; catches edits that keep mtime and size (coarse mtime clocks)

try:  # libyaml is ~10x faster; fall back to the pure-Python loader
    _Loader: Any = yaml.CSafeLoader
except AttributeError:  # pragma: no cover - depends on how PyYAML was built
    _Loader = yaml.SafeLoader


class EndpointsFileError(UserError):
    """The endpoints file (or a flag endpoint) is malformed."""


@dataclass(frozen=True, slots=True)
class EndpointSpec:
    """One `ip:port` as configured; turned into a fresh `Endpoint` on every publish."""

    address: str
    port: int
    name: str = ""
    namespace: str = ""
    labels: tuple[tuple[str, str], ...] = ()
    ready: bool = True
    metrics_port: int = 0

    @property
    def key(self) -> str:
        return format_hostport(self.address, self.port)

    def to_endpoint(self, keys: LabelKeys, default_labels: Mapping[str, str]) -> Endpoint:
        labels = dict(default_labels)
        labels.update(self.labels)
        return endpoint_from_labels(
            self.address,
            self.port,
            self.name or self.key,
            self.namespace,
            labels,
            self.ready,
            keys,
            metrics_port=self.metrics_port,
        )


# ---- parsing (pure) ----------------------------------------------------------------------
def _check_address(value: object, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise EndpointsFileError(f"{where}: `address` must be a non-empty string")
    text = value.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise EndpointsFileError(
            f"{where}: `address` {value!r} is not an IP address (Envoy routes on ip:port)"
        ) from None


def _check_port(value: object, where: str, field: str, *, allow_zero: bool = False) -> int:
    low = 0 if allow_zero else 1
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= 65535:
        raise EndpointsFileError(f"{where}: `{field}` must be an integer {low}..65535")
    return value


def _check_labels(value: object, where: str) -> tuple[tuple[str, str], ...]:
    if value is None:
        return ()
    if not isinstance(value, Mapping):
        raise EndpointsFileError(f"{where}: `labels` must be a mapping of strings")
    out: list[tuple[str, str]] = []
    for k, v in value.items():
        if not isinstance(k, str):
            raise EndpointsFileError(f"{where}: label key {k!r} must be a string")
        if isinstance(v, bool):
            v = "true" if v else "false"
        elif isinstance(v, int | float):
            v = str(v)
        elif v is None:
            v = ""
        if not isinstance(v, str):
            raise EndpointsFileError(f"{where}: label {k!r} must have a scalar value")
        out.append((k, v))
    return tuple(sorted(out))


def _parse_entry(raw: object, index: int) -> list[EndpointSpec]:
    where = f"endpoints[{index}]"
    if not isinstance(raw, Mapping):
        raise EndpointsFileError(f"{where}: each entry must be a mapping, got {raw!r}")
    unknown = set(raw) - _ENTRY_KEYS
    if unknown:
        raise EndpointsFileError(
            f"{where}: unknown key(s) {sorted(map(str, unknown))}; allowed: {sorted(_ENTRY_KEYS)}"
        )
    address = _check_address(raw.get("address"), where)
    if ("port" in raw) == ("ports" in raw):
        raise EndpointsFileError(f"{where}: give exactly one of `port` or `ports`")
    if "port" in raw:
        ports = [_check_port(raw["port"], where, "port")]
    else:
        plist = raw["ports"]
        if not isinstance(plist, list) or not plist:
            raise EndpointsFileError(f"{where}: `ports` must be a non-empty list")
        ports = [_check_port(p, where, "ports[]") for p in plist]
    name = raw.get("name") or ""
    namespace = raw.get("namespace") or ""
    if not isinstance(name, str) or not isinstance(namespace, str):
        raise EndpointsFileError(f"{where}: `name` and `namespace` must be strings")
    ready = raw.get("ready", True)
    if not isinstance(ready, bool):
        raise EndpointsFileError(f"{where}: `ready` must be true or false")
    metrics_port = _check_port(raw.get("metricsPort", 0), where, "metricsPort", allow_zero=True)
    labels = _check_labels(raw.get("labels"), where)
    multi = len(ports) > 1
    return [
        EndpointSpec(
            address=address,
            port=p,
            # A pod with several ports is several endpoints; keep their names distinct.
            name=f"{name}:{p}" if (name and multi) else name,
            namespace=namespace,
            labels=labels,
            ready=ready,
            metrics_port=metrics_port,
        )
        for p in ports
    ]


def parse_endpoints_document(doc: object) -> list[EndpointSpec]:
    """Validate a loaded YAML document; raises `EndpointsFileError` with the entry index."""
    if doc is None:
        raise EndpointsFileError("the file is empty (write `endpoints: []` for no endpoints)")
    if isinstance(doc, Mapping):
        extra = set(doc) - {"endpoints"}
        if extra or "endpoints" not in doc:
            raise EndpointsFileError(
                f"top-level mapping must have exactly one key `endpoints`, got {sorted(doc)}"
            )
        doc = doc["endpoints"]
    if not isinstance(doc, list):
        raise EndpointsFileError("expected a list of endpoints (or `endpoints: [...]`)")
    specs: list[EndpointSpec] = []
    seen: set[str] = set()
    for i, raw in enumerate(doc):
        for spec in _parse_entry(raw, i):
            if spec.key in seen:
                raise EndpointsFileError(f"endpoints[{i}]: duplicate endpoint {spec.key}")
            seen.add(spec.key)
            specs.append(spec)
    return specs


def parse_endpoints_yaml(data: bytes | str) -> list[EndpointSpec]:
    try:
        doc = yaml.load(data, Loader=_Loader)  # CSafeLoader / SafeLoader
    except yaml.YAMLError as e:
        raise EndpointsFileError(f"invalid YAML: {e}") from None
    return parse_endpoints_document(doc)


def parse_flag_endpoint(text: str, target_ports: Sequence[int] = ()) -> list[EndpointSpec]:
    """`ip:port` or `ip:port1,port2` (IPv6: `[::1]:8000`) -> specs; a bare IP takes
    `target_ports` (`--endpoint-target-ports`)."""
    s = text.strip()
    where = f"endpoint {text!r}"
    if target_ports and ":" not in s.strip("[]"):
        address = _check_address(s, where)
        return [
            EndpointSpec(address=address, port=_check_port(p, where, "port")) for p in target_ports
        ]
    if s.startswith("["):
        host, sep, ports_s = s[1:].partition("]:")
        if not sep:
            raise EndpointsFileError(f"{where}: expected [ipv6]:port")
    else:
        host, sep, ports_s = s.rpartition(":")
        if not sep or ":" in host:
            raise EndpointsFileError(f"{where}: expected ip:port (IPv6 as [addr]:port)")
    address = _check_address(host, where)
    specs = []
    for p in ports_s.split(","):
        try:
            port = int(p)
        except ValueError:
            raise EndpointsFileError(f"{where}: bad port {p!r}") from None
        specs.append(EndpointSpec(address=address, port=_check_port(port, where, "port")))
    return specs


def parse_flag_endpoints(
    values: Sequence[str], target_ports: Sequence[int] = ()
) -> list[EndpointSpec]:
    return [spec for v in values if v.strip() for spec in parse_flag_endpoint(v, target_ports)]


# ---- the source -------------------------------------------------------------------------
_Sig = tuple[int, int, int]


def _stat_sig(path: str) -> _Sig | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


def _read(path: str) -> tuple[bytes, bytes]:
    with open(path, "rb") as f:
        data = f.read()
    return data, hashlib.blake2b(data, digest_size=16).digest()


class StaticSource:
    """Pushes the endpoints from flags and an optional YAML file into the datastore."""

    def __init__(
        self,
        datastore: Datastore,
        *,
        endpoints_file: str | None = None,
        endpoints: Sequence[str] = (),
        default_labels: Mapping[str, str] | None = None,
        label_keys: LabelKeys = DEFAULT_LABEL_KEYS,
        poll_interval: float = 1.0,
        selector: Mapping[str, str] | None = None,
        target_ports: Sequence[int] = (),
    ) -> None:
        self._ds = datastore
        self._selector = dict(selector or {})  # only endpoints whose labels all match
        self._target_ports = list(target_ports)
        self._path = endpoints_file
        self._flag_values = list(endpoints)
        self._defaults = dict(default_labels or {})
        self._keys = label_keys
        self._interval = max(poll_interval, 0.01)
        self._settle = min(0.05, self._interval / 2)
        self._flag_specs: list[EndpointSpec] = []
        self._file_specs: list[EndpointSpec] = []
        self._sig: _Sig | None = None
        self._digest: bytes | None = None  # last content looked at (good or bad)
        self._missing_logged = False
        self._polls = 0
        self._task: asyncio.Task[None] | None = None
        self.reloads = 0  # successful file loads, the first one included
        self.last_error: str | None = None  # None when the current file content is good

    async def start(self) -> None:
        """Load everything once (raises `EndpointsFileError` if that fails), then poll."""
        self._ds.register_source(SOURCE_NAME)
        self._flag_specs = parse_flag_endpoints(self._flag_values, self._target_ports)
        if self._path is not None:
            sig = _stat_sig(self._path)
            if sig is None:
                raise EndpointsFileError(f"endpoints file {self._path} does not exist")
            data, digest = await asyncio.to_thread(_read, self._path)
            try:
                self._file_specs = parse_endpoints_yaml(data)
            except EndpointsFileError as e:
                raise EndpointsFileError(f"endpoints file {self._path}: {e}") from None
            self._sig, self._digest = sig, digest
            self.reloads += 1
        self._publish()
        self._ds.mark_synced(SOURCE_NAME)
        if self._path is not None:
            self._task = asyncio.create_task(self._poll_loop(), name="static-source-poll")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def specs(self) -> list[EndpointSpec]:
        """The effective configuration (flags, then the file overriding)."""
        merged: dict[str, EndpointSpec] = {s.key: s for s in self._flag_specs}
        for s in self._file_specs:
            if s.key in merged:
                log.warning("endpoint %s is in the flags and in the file; the file wins", s.key)
            merged[s.key] = s
        return list(merged.values())

    def _publish(self) -> None:
        eps = [s.to_endpoint(self._keys, self._defaults) for s in self.specs()]
        if self._selector:
            sel = self._selector.items()
            eps = [ep for ep in eps if all(ep.labels.get(k) == v for k, v in sel)]
        self._ds.replace_endpoints(SOURCE_NAME, eps)

    async def _poll_loop(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                await self.check_file()
            except asyncio.CancelledError:
                raise
            except Exception:  # never let the poller die; the next poll retries
                log.exception("endpoints file %s: unexpected error while reloading", self._path)

    async def check_file(self) -> bool:
        """One poll step. Returns True if a new good view was published."""
        assert self._path is not None
        path = self._path
        self._polls += 1
        sig = _stat_sig(path)
        if sig is None:
            if not self._missing_logged:
                log.error(
                    "endpoints file %s is missing; keeping the last good view (%d endpoints)",
                    path,
                    len(self._file_specs),
                )
                self._missing_logged = True
            self._sig = None
            return False
        self._missing_logged = False
        if sig == self._sig and self._polls % _REHASH_EVERY:
            return False
        if sig != self._sig:
            await asyncio.sleep(self._settle)  # let a writer finish before reading
            if _stat_sig(path) != sig:
                return False  # still changing; look again next poll
        try:
            data, digest = await asyncio.to_thread(_read, path)
        except OSError as e:
            log.error("endpoints file %s: cannot read (%s); keeping the last good view", path, e)
            return False
        self._sig = sig
        if digest == self._digest:
            return False
        self._digest = digest
        try:
            specs = await asyncio.to_thread(parse_endpoints_yaml, data)
        except EndpointsFileError as e:
            self.last_error = str(e)
            log.error(
                "endpoints file %s: %s; keeping the last good view (%d endpoints)",
                path,
                e,
                len(self._file_specs),
            )
            return False
        self.last_error = None
        self._file_specs = specs
        self.reloads += 1
        self._publish()
        log.info("endpoints file %s reloaded: %d endpoints", path, len(specs))
        return True
