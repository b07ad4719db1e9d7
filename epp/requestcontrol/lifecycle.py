"""Request-lifecycle extension points: what happens to a request around its scheduling.

A `LifecycleHook` is a plugin the EndpointPickerConfig names like any scheduler plugin. The
director calls, for each request that was scheduled:

* `pre_request` once, right after the pick (before Envoy hears of it): accounting;
* `response_headers` when the model server's response headers arrive (with the status);
* `first_token` at most once, when the first token is back (`learn`: the time is a true
  time-to-first-token, not the end of a non-streamed answer);
* `prefill_done` exactly once: the prefill work is over (first token, the predicted TTFT
  passed with no signal, or the request ended);
* `complete` on a successful end with the generated token count (from `usage`);
* `release` exactly once, however the request ends (done, error, reset, cancel).

Hooks declare in `consumes` which per-request data the scheduler must produce for them
(`PREFIX_HASHES`, `PREDICTIONS`); nothing is computed that no configured plugin reads.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from epp.requestcontrol.decision import Decision
from epp.scheduling.framework import Plugin


class LifecycleHook(Plugin):
    consumes: ClassVar[frozenset[str]] = frozenset()

    def pre_request(self, d: Decision) -> None:
        """The request was scheduled and is about to be sent."""

    def response_headers(self, d: Decision, status: int) -> None:
        """The model server answered with `status` (0 when unknown)."""

    def first_token(self, d: Decision, now: float, learn: bool) -> None:
        """The first token is back at `now` (monotonic)."""

    def prefill_done(self, d: Decision) -> None:
        """The prefill work of the request is over (called exactly once)."""

    def complete(self, d: Decision, output_tokens: int, now: float) -> None:
        """A successful response ended with `output_tokens` generated."""

    def release(self, d: Decision) -> None:
        """The request is over, however it ended (called exactly once)."""


def overrides(hook: LifecycleHook, method: str) -> bool:
    return getattr(type(hook), method) is not getattr(LifecycleHook, method)


class HookSet:
    """The configured hooks, split by the methods they implement. A decision keeps the set
    it was made with, so a config reload never hands a request to hooks that did not see
    its start."""

    __slots__ = (
        "complete",
        "first_token",
        "hooks",
        "pre_request",
        "prefill_done",
        "release",
        "response_headers",
    )

    def __init__(
        self, hooks: list[LifecycleHook], internal: Sequence[LifecycleHook] = ()
    ) -> None:
        self.hooks = hooks  # the configured ones; `internal` (the director's own) run last
        every = [*hooks, *internal]
        self.pre_request = [h for h in every if overrides(h, "pre_request")]
        self.response_headers = [h for h in every if overrides(h, "response_headers")]
        self.first_token = [h for h in every if overrides(h, "first_token")]
        self.prefill_done = [h for h in every if overrides(h, "prefill_done")]
        self.complete = [h for h in every if overrides(h, "complete")]
        self.release = [h for h in every if overrides(h, "release")]

    def consumes(self) -> frozenset[str]:
        return frozenset().union(*(h.consumes for h in self.hooks))
