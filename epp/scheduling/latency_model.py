"""Per-endpoint latency model: predicted TTFT and TPOT, learned online.

TTFT ≈ base + wait + uncached prompt tokens / prefill speed. The wait is the prefill work
queued ahead (a fluid model of the uncached tokens the EPP sent, drained at the prefill
speed, corrected by the engine's reported queue) or, with every sequence slot taken, the
time for requests to finish. Speeds come from what the EPP observes: true first tokens and
usage when the gateway sends response bodies, and always the engine's own token-latency
histogram over windows with no prefill running, which says how much slower than the
priors (an 8B model on one H100) the endpoint runs; the simulator's time scale looks the
same. Per-endpoint state lives on `Endpoint.latency` and `Endpoint.queue`.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace
from itertools import islice

from epp import clock
from epp.datalayer.endpoint import Endpoint

log = logging.getLogger(__name__)

PICK_RATE_TAU_S = 5.0  # time constant of the per-endpoint pick-rate estimate
MIN_TPOT_SAMPLES = 4  # tokens a scrape window needs to say something about decode speed
MIN_SPEED_FACTOR, MAX_SPEED_FACTOR = 0.2, 20.0
DECODE_SPEED_TTL_S = 10.0  # a decode-speed reading older than this is forgotten
METRICS_FRESH_S = 0.25  # scraped queue sizes older than this are not used
FLEET_SPEED_ALPHA = 0.2
MID_PREFILL_REQUESTS = 2  # prompts an engine with nothing waiting may still be prefilling
SCRAPE_SLACK_S = 0.02  # picks this long before a scrape may not be in it yet
FIRST_READING_MAX_VS_FLEET = 3.0  # a pod's first decode-speed reading, at most this slower
PRIORS_HINT_FACTOR = 1.5  # the fleet's first reading this far from the priors: say so


@dataclass(slots=True)
class QueueEstimate:
    tokens_per_s: float  # the endpoint's prefill speed
    backlog_tokens: float  # prefill work ahead of a new request
    slot_wait_s: float  # wait for a sequence slot when the batch is full
    running: float  # the decode batch (EPP in-flight or scraped running, the larger)

    @property
    def wait_s(self) -> float:
        backlog_s = self.backlog_tokens / self.tokens_per_s
        return backlog_s if backlog_s > self.slot_wait_s else self.slot_wait_s


@dataclass(slots=True)
class LatencyPriors:
    ttft_base_ms: float = 30.0
    prefill_ms_per_token: float = 0.25
    tpot_ms: float = 12.0
    tpot_per_seq_ms: float = 0.15
    unknown_queue_tokens: int = 512  # prompt tokens assumed per request we did not send


class LatencyModel:
    """`priors` start as the static defaults and then follow the fleet: every observation
    also moves them, so an endpoint with no observations of its own is predicted like the
    average endpoint, not like an H100 (which would bias picks toward observed endpoints)."""

    def __init__(self, priors: LatencyPriors | None = None, alpha: float = 0.2) -> None:
        self.configured = priors or LatencyPriors()  # as given, before the fleet moves them
        self.priors = replace(self.configured)
        self.alpha = alpha
        self.fleet_alpha = alpha / 4
        self.fleet_speed = 1.0  # the fleet's speed factor (see `speed_factor`)
        self.fleet_measured = False  # until the first decode-speed reading on any pod

    def set_priors(self, priors: LatencyPriors) -> None:
        """Start from `priors` (the config's `latencyPriors`: what one pod does before it is
        measured). The same priors again change nothing, so a config reload keeps what the
        fleet taught them. Speed factors are relative to the priors' decode speed, so the
        fleet's measured speed is carried over in ms per token, not as a factor."""
        if priors == self.configured:
            return
        old_tpot_ms = self.priors.tpot_ms
        self.configured = priors
        self.priors = replace(priors)
        if self.fleet_measured:
            self.fleet_speed *= old_tpot_ms / priors.tpot_ms

    # ---- prediction (hot path) ------------------------------------------------------------
    def queue(
        self,
        ep: Endpoint,
        now: float,
        decode_tokens: int = 256,
        speeds: tuple[float, float] | None = None,
    ) -> QueueEstimate:
        """What a request sent to `ep` now would wait behind: the prefill work ahead (the
        fluid model of what the EPP sent, raised to the engine's reported waiting queue
        when that is fresh and larger) or, when every sequence slot is taken, requests
        finishing (`decode_tokens`: how long a typical request holds its slot). `speeds`:
        `self.speeds(ep, now)` when the caller already has it."""
        lat, inf, m = ep.latency, ep.inflight, ep.metrics
        if speeds is None:
            speeds = self.speeds(ep, now)
        rate = self.prefill_tokens_per_s(ep, now, speeds)
        backlog = self.backlog_tokens(ep, now, rate)
        # (comparisons, not max(): this runs for every endpoint of every pick)
        running = float(inf.requests) if inf.requests > m.running else m.running
        slot_wait_s = 0.0
        age = now - m.updated_at
        cap = lat.max_running
        if cap > 1 and (m.running >= cap or inf.requests > cap):
            # every sequence slot is taken: the queue waits for requests to finish
            waiting = m.waiting + self.pick_rate(ep, now) * age if age <= METRICS_FRESH_S else 0.0
            waiting = max(waiting, inf.requests - cap)
            slot_wait_s = waiting * self.decode_time_s(ep, decode_tokens, now, speeds) / cap
        elif m.waiting > 0 and age <= METRICS_FRESH_S:
            # queued prefill work the EPP's model no longer counts
            backlog = max(backlog, self.waiting_tokens(ep, m.waiting))
        return QueueEstimate(rate, backlog, slot_wait_s, running)

    def waiting_tokens(self, ep: Endpoint, waiting: float) -> float:
        """Prompt tokens still to prefill for the `waiting` requests the engine reports: in
        a first-come queue those are the newest sent there, so the uncached tokens of the
        last `waiting` requests sent (their mean past those remembered). Not the mean of
        everything sent: the cache-hit followers waiting behind one cold prompt have a few
        tokens each to prefill, whatever the cold prompts pulled the mean up to."""
        recent = ep.queue.recent_uncached
        n = len(recent)
        if n == 0:
            return waiting * self.mean_sent_tokens(ep)
        k = int(waiting)
        if k <= n:
            return float(sum(islice(reversed(recent), k)))
        total = float(sum(recent))
        return total + (waiting - n) * total / n

    def mean_sent_tokens(self, ep: Endpoint) -> float:
        """Mean uncached prompt tokens per request sent to `ep` (the prior's guess before any)."""
        return ep.latency.uncached_tokens or self.priors.unknown_queue_tokens

    def queued_prefill_tokens(self, ep: Endpoint, now: float | None = None) -> int:
        return int(self.queue(ep, clock.now() if now is None else now).backlog_tokens)

    def predict_ttft_ms(
        self,
        ep: Endpoint,
        uncached_tokens: int,
        queue: QueueEstimate | None = None,
        now: float | None = None,
    ) -> float:
        if now is None:
            now = clock.now()
        q = queue or self.queue(ep, now)
        base = ep.latency.ttft_base_ms or self.priors.ttft_base_ms * self.speed_factor(ep, now)
        return base + 1000.0 * (q.wait_s + uncached_tokens / q.tokens_per_s)

    def batch_size(self, ep: Endpoint) -> float:
        return max(float(ep.inflight.requests), ep.metrics.running)

    def predict_tpot_ms(self, ep: Endpoint, extra_seqs: int = 1, now: float | None = None) -> float:
        lat = ep.latency
        per_seq = lat.tpot_per_seq_ms or self.priors.tpot_per_seq_ms
        if lat.tpot_ms:  # learned from responses' usage
            return lat.tpot_ms + per_seq * (self.batch_size(ep) + extra_seqs)
        now = clock.now() if now is None else now
        decode = self.decode_tpot_ms(ep, now)
        if decode:  # the engine's own decode speed at its current batch, one more seq
            return decode + per_seq * extra_seqs
        speed = self.speed_factor(ep, now)
        return (self.priors.tpot_ms + per_seq * (self.batch_size(ep) + extra_seqs)) * speed

    # ---- what the engines report about their own speed ------------------------------------
    def refresh(self, ep: Endpoint, now: float) -> None:
        """Take in a scrape of `ep` newer than the last one seen: its batch limit and its
        decode speed, the mean token latency over windows in which no prefill the EPP sent
        was running there (a prefill chunk makes that step many times slower). Cheap when
        there is nothing new."""
        lat, m = ep.latency, ep.metrics
        if m.updated_at <= lat.tpot_seen_at:
            return
        window_start = lat.tpot_seen_at
        lat.tpot_seen_at = m.updated_at
        if m.running > lat.max_running:
            lat.max_running = m.running
        if m.waiting <= 0:
            self._bound_backlog(ep, now)
        if m.tpot_count < 0:
            return
        dcount = m.tpot_count - lat.tpot_seen_count
        quiet = self.prefill_free_since(ep, self.prefill_tokens_per_s(ep, now)) <= window_start
        if quiet and lat.tpot_seen_count >= 0 and dcount >= MIN_TPOT_SAMPLES:
            # (rounded to a microsecond: the engines' float sums carry rounding noise)
            sample = round((m.tpot_sum - lat.tpot_seen_sum) * 1000.0 / dcount, 3)
            if sample > 0:
                cur = lat.decode_tpot_ms
                if cur == 0:
                    # A first reading far slower than the fleet is more likely a window
                    # polluted by a prefill step the EPP did not count than a slow pod:
                    # start from a plausible speed and let the readings that follow move
                    # it. (Taken as it was, one polluted window slowed the pod's predicted
                    # prefill so much that its queue never looked drained again, and no
                    # clean window could correct it.)
                    cur = FIRST_READING_MAX_VS_FLEET * self.fleet_speed * self.priors.tpot_ms
                # A lower envelope: polluted windows only ever read slow, so the estimate
                # follows fast samples at once and slow ones gently.
                if sample < cur:
                    lat.decode_tpot_ms = sample
                else:
                    lat.decode_tpot_ms = cur + 0.05 * (sample - cur)
                lat.decode_tpot_at = now
                # The fleet's factor (for pods that never decode, e.g. prefill pods) follows
                # every reading quickly: pods of one pool are mostly alike. The first reading
                # replaces the priors' guess outright: averaged with a guess that may be off
                # 2-4x, it left the pods not measured yet mispredicted for several readings
                # (bench/RESULTS.md §0, "The fleet's first speed reading").
                factor = lat.decode_tpot_ms / self.priors.tpot_ms
                if self.fleet_measured:
                    self.fleet_speed += FLEET_SPEED_ALPHA * (factor - self.fleet_speed)
                else:
                    self.fleet_speed, self.fleet_measured = factor, True
                    self._hint_priors(ep, lat.decode_tpot_ms)
        if dcount != 0 or lat.tpot_seen_count < 0:
            lat.tpot_seen_sum, lat.tpot_seen_count = m.tpot_sum, m.tpot_count

    def _hint_priors(self, ep: Endpoint, tpot_ms: float) -> None:
        """Once, at the fleet's first reading: when the pool is far from the priors, the
        picks before it were placed on wrong speeds; `latencyPriors` avoids that."""
        ratio = tpot_ms / self.priors.tpot_ms
        if 1.0 / PRIORS_HINT_FACTOR < ratio < PRIORS_HINT_FACTOR:
            return
        log.info(
            "first decode-speed reading: %s decodes at %.1f ms a token, %.1fx the latency "
            "priors' %.1f; the picks until now assumed the priors' speed. To start from the "
            "pool's own speed after a restart, set latencyPriors.decodeMsPerToken (and "
            "prefillTokensPerSecond) in the EndpointPickerConfig (docs/scheduling.md)",
            ep.key, tpot_ms, ratio, self.priors.tpot_ms,
            extra={"endpoint": ep.key, "decode_ms_per_token": tpot_ms},
        )  # fmt: skip

    def speeds(self, ep: Endpoint, now: float) -> tuple[float, float]:
        """`(decode_tpot_ms, speed_factor)` of `ep`, the scrape taken in once: callers that
        need both, or pass them on (`queue`), read the endpoint's speed only once a pick."""
        lat = ep.latency
        if ep.metrics.updated_at > lat.tpot_seen_at:
            self.refresh(ep, now)
        tpot = lat.decode_tpot_ms
        if tpot > 0 and now - lat.decode_tpot_at <= DECODE_SPEED_TTL_S:
            f = tpot / self.priors.tpot_ms
        else:
            tpot, f = 0.0, self.fleet_speed
        if f < MIN_SPEED_FACTOR:
            f = MIN_SPEED_FACTOR
        elif f > MAX_SPEED_FACTOR:
            f = MAX_SPEED_FACTOR
        return tpot, f

    def estimate(self, ep: Endpoint, now: float) -> tuple[float, float, bool]:
        """What the model takes `ep` to do now, for the operators' gauges: `(decode ms per
        token, prefill tokens per second, measured)`; not measured = the fleet's speed or
        the priors (what `latencyPriors` should say, once the fleet has been measured)."""
        speeds = self.speeds(ep, now)
        tpot_ms, factor = speeds
        measured = tpot_ms > 0 or ep.latency.prefill_ms_per_token > 0
        decode_ms = tpot_ms or self.priors.tpot_ms * factor
        return decode_ms, self.prefill_tokens_per_s(ep, now, speeds), measured

    def decode_tpot_ms(self, ep: Endpoint, now: float) -> float:
        """The endpoint's decode speed (ms per token) from quiet scrape windows; 0 = unknown
        (also when the last quiet window is older than `DECODE_SPEED_TTL_S`: an endpoint
        judged slow that then got no traffic is not judged slow forever)."""
        return self.speeds(ep, now)[0]

    def speed_factor(self, ep: Endpoint, now: float) -> float:
        """How much slower than the priors this endpoint runs (its decode speed over the
        prior's; the fleet's when it has none). A GPU slows prefill and decode alike, and
        so does the simulator's time scale."""
        return self.speeds(ep, now)[1]

    def decode_time_s(
        self, ep: Endpoint, tokens: int, now: float, speeds: tuple[float, float] | None = None
    ) -> float:
        """How long `tokens` output tokens probably take to decode on `ep`."""
        tpot_ms, factor = speeds or self.speeds(ep, now)
        return tokens * (tpot_ms or self.priors.tpot_ms * factor) / 1000.0

    # ---- prefill queue, fluid model ------------------------------------------------------------
    def prefill_tokens_per_s(
        self, ep: Endpoint, now: float, speeds: tuple[float, float] | None = None
    ) -> float:
        lat = ep.latency
        if lat.prefill_ms_per_token:  # learned from true first tokens
            return 1000.0 / lat.prefill_ms_per_token
        factor = (speeds or self.speeds(ep, now))[1]
        return 1000.0 / (self.priors.prefill_ms_per_token * factor)

    def backlog_tokens(self, ep: Endpoint, now: float, tokens_per_s: float) -> float:
        """Uncached prompt tokens sent to `ep` and probably not prefilled yet at `now`."""
        inf = ep.queue
        b = inf.backlog_tokens
        if b <= 0.0:
            return 0.0
        b -= tokens_per_s * (now - inf.backlog_at)
        return b if b > 0.0 else 0.0

    def charge_backlog(self, ep: Endpoint, tokens: int, now: float) -> None:
        inf = ep.queue
        rate = self.prefill_tokens_per_s(ep, now)
        inf.backlog_tokens = self.backlog_tokens(ep, now, rate) + tokens
        inf.backlog_at = now
        inf.charged_total += tokens
        inf.recent_uncached.append(tokens)
        inf.pick_rate = self.pick_rate(ep, now) + 1.0 / PICK_RATE_TAU_S
        inf.last_pick_at = now

    def _bound_backlog(self, ep: Endpoint, now: float) -> None:
        """The engine says nothing waits to be scheduled: every prompt sent before its scrape
        is being prefilled or done, so what is left is at most the prompts mid-prefill
        (the engine's token budget per step lets a few share it) and those sent since.
        Without this, an uncached-token guess too high or a prefill speed too slow
        (nothing else corrects them when the gateway sends no response bodies) pile up in
        the fluid queue for good: the pod looks busy when it is not."""
        q = ep.queue
        if q.backlog_tokens <= 0.0:
            return
        per = self.mean_sent_tokens(ep)
        since_scrape = self.pick_rate(ep, now) * (now - ep.metrics.updated_at + SCRAPE_SLACK_S)
        bound = (MID_PREFILL_REQUESTS + since_scrape) * per
        rate = self.prefill_tokens_per_s(ep, now)
        if self.backlog_tokens(ep, now, rate) > bound:
            q.backlog_tokens = bound
            q.backlog_at = now

    def settle_backlog(self, ep: Endpoint, position: float, now: float) -> None:
        """A request queued at `position` (charged_total right after its charge) has its
        first token: everything charged before it is prefilled too."""
        inf = ep.queue
        ahead_of_now = inf.charged_total - position
        current = self.backlog_tokens(ep, now, self.prefill_tokens_per_s(ep, now))
        inf.backlog_tokens = min(current, max(0.0, ahead_of_now))
        inf.backlog_at = now

    def prefill_free_since(self, ep: Endpoint, tokens_per_s: float) -> float:
        """When the prefill work the EPP sent to `ep` was (or will be) done."""
        q = ep.queue
        return q.backlog_at + q.backlog_tokens / tokens_per_s

    def pick_rate(self, ep: Endpoint, now: float) -> float:
        """Requests per second recently sent to `ep` (exponentially decaying average)."""
        inf = ep.queue
        if inf.pick_rate <= 0.0:
            return 0.0
        return inf.pick_rate * math.exp(-(now - inf.last_pick_at) / PICK_RATE_TAU_S)

    # ---- learning ----------------------------------------------------------------------------
    def observe_sent(self, ep: Endpoint, uncached_tokens: int) -> None:
        lat = ep.latency
        if lat.uncached_tokens == 0:
            lat.uncached_tokens = float(uncached_tokens)
        else:
            lat.uncached_tokens += self.alpha * (uncached_tokens - lat.uncached_tokens)

    def observe_ttft(self, ep: Endpoint, ttft_ms: float, prefill_tokens: int) -> None:
        """`prefill_tokens`: this request's uncached tokens plus the work queued ahead of it."""
        lat = ep.latency
        a = self.alpha
        base = lat.ttft_base_ms or self.priors.ttft_base_ms
        pr = self.priors
        fa = self.fleet_alpha
        if prefill_tokens >= 256:
            rate = max(1e-4, (ttft_ms - base) / prefill_tokens)
            cur = lat.prefill_ms_per_token or pr.prefill_ms_per_token
            lat.prefill_ms_per_token = cur + a * (rate - cur)
            pr.prefill_ms_per_token += fa * (rate - pr.prefill_ms_per_token)
        else:
            rate = lat.prefill_ms_per_token or pr.prefill_ms_per_token
            sample = max(0.1, ttft_ms - rate * prefill_tokens)
            lat.ttft_base_ms = base + a * (sample - base)
            pr.ttft_base_ms += fa * (sample - pr.ttft_base_ms)
        lat.samples += 1

    def observe_tpot(self, ep: Endpoint, tpot_ms: float, batch: float) -> None:
        lat = ep.latency
        per_seq = lat.tpot_per_seq_ms or self.priors.tpot_per_seq_ms
        base = lat.tpot_ms or self.priors.tpot_ms
        sample = max(0.05, tpot_ms - per_seq * batch)
        lat.tpot_ms = base + self.alpha * (sample - base)
        self.priors.tpot_ms += self.fleet_alpha * (sample - self.priors.tpot_ms)
