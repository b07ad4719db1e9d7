"""Profile handlers: single profile, and prefill/decode disaggregation."""

from __future__ import annotations

from epp import clock
from epp.datalayer.endpoint import ROLE_DECODE, ROLE_PREFILL, Endpoint
from epp.scheduling.framework import (
    PDDecision,
    ProfileHandler,
    ProfileRunner,
    SchedulingResult,
)
from epp.scheduling.plugins.common import prefix_match, uncached_tokens
from epp.scheduling.request import CycleState, InferenceRequest


class SingleProfileHandler(ProfileHandler):
    """Runs one profile (parameter `profile`, default: the first configured)."""

    type_name = "single-profile-handler"

    def schedule(
        self,
        runner: ProfileRunner,
        cycle: CycleState,
        request: InferenceRequest,
        candidates: list[Endpoint],
    ) -> SchedulingResult | None:
        profile = str(self.params.get("profile", runner.default_profile()))
        res = runner.run(profile, cycle, request, candidates)
        if res is None or not res.ranked:
            return None
        out = SchedulingResult(primary=res.ranked, profiles={profile: res})
        out.uncached_tokens = uncached_tokens(cycle, self.services, request, res.ranked[0])
        return out


class PDProfileHandler(ProfileHandler):
    """Decode endpoint first; then a prefill endpoint only when the hop pays off.

    The hop is taken when the request's uncached prompt on the chosen decode endpoint is at
    least `threshold` tokens AND the predicted cost of prefilling remotely (prefill
    endpoint's queue + uncached work there + KV transfer + hop overhead) is below the cost
    of prefilling locally: the decode endpoint's queue + uncached work, plus the stall a
    local prefill puts on every stream decoding there (each one waits for it). A
    multi-turn conversation whose history is cached on a quiet decode pod stays local; a
    long fresh prompt, or any prefill on a pod with a large decode batch, goes to an idle
    prefill pod.
    Parameters: decodeProfile (decode), prefillProfile (prefill), threshold (64 tokens;
    256 for policy `threshold`), kvTransferMsPerKToken (1.0), hopOverheadMs (3.0),
    decodeStallWeight (0.25: the share of the local prefill time counted per running
    stream), bothRolePodsPrefill (false: only `prefill` pods take prefill hops), and
    `policy`: `cost` (the rule above, default), `threshold` (disaggregate whenever the
    uncached prompt reaches `threshold`: the other routers' rule) or `always` (every request
    with a prefill endpoint available: a PD-mode router's behaviour). Every result carries a
    `PDDecision` (disaggregated or not, and why) for logs and metrics.
    """

    type_name = "pd-profile-handler"
    POLICIES = ("cost", "threshold", "always")

    def configure(self) -> None:
        p = self.params
        self.decode_profile = str(p.get("decodeProfile", "decode"))
        self.prefill_profile = str(p.get("prefillProfile", "prefill"))
        self.policy = str(p.get("policy", "cost"))
        self.threshold = int(p.get("threshold", 256 if self.policy == "threshold" else 64))
        self.transfer_ms_per_ktok = float(p.get("kvTransferMsPerKToken", 1.0))
        self.hop_ms = float(p.get("hopOverheadMs", 3.0))
        self.stall_weight = float(p.get("decodeStallWeight", 0.25))
        # Pods labelled `both` take prefill hops only when asked: a pool of `both` pods
        # normally has no sidecars to act on them.
        self.both_prefill = bool(p.get("bothRolePodsPrefill", False))
        if self.policy not in self.POLICIES:
            raise ValueError(
                f"pd-profile-handler: policy must be one of {self.POLICIES}, got {self.policy!r}"
            )

    def _local_uncached(
        self, cycle: CycleState, request: InferenceRequest, target: Endpoint
    ) -> int:
        """Uncached prompt tokens on the decode endpoint, not counting blocks whose KV is
        still on its way there from an earlier request's remote prefill: an engine
        prefilling now would compute those again."""
        uncached = uncached_tokens(cycle, self.services, request, target)
        index = self.services.prefix_index
        match = prefix_match(cycle, self.services, request)
        matched = match.matched_blocks.get(target.key, 0)
        landed = index.landed_blocks(target.key, match.hashes, matched)
        if landed < matched:
            uncached = max(uncached, request.prompt_tokens - landed * index.block_tokens)
        return uncached

    def schedule(
        self,
        runner: ProfileRunner,
        cycle: CycleState,
        request: InferenceRequest,
        candidates: list[Endpoint],
    ) -> SchedulingResult | None:
        decode = runner.run(self.decode_profile, cycle, request, candidates)
        if decode is None or not decode.ranked:
            return None
        target = decode.ranked[0]
        result = SchedulingResult(primary=decode.ranked, profiles={self.decode_profile: decode})
        local_uncached = self._local_uncached(cycle, request, target)
        result.uncached_tokens = local_uncached
        if not runner.has_profile(self.prefill_profile):
            result.pd = PDDecision(False, "no-prefill-profile", local_uncached)
            return result
        if self.policy != "always" and local_uncached < self.threshold:
            result.pd = PDDecision(False, "below-threshold", local_uncached)
            return result
        prefill_candidates = [
            ep
            for ep in candidates
            if ep is not target
            and (ep.role == ROLE_PREFILL or (self.both_prefill and ep.can_prefill()))
        ]
        prefill = (
            runner.run(self.prefill_profile, cycle, request, prefill_candidates)
            if prefill_candidates
            else None
        )
        if prefill is None or not prefill.ranked:
            result.pd = PDDecision(False, "no-prefill-endpoint", local_uncached)
            return result
        pf = prefill.ranked[0]
        remote_uncached = uncached_tokens(cycle, self.services, request, pf)
        if self.policy == "cost":
            model = self.services.latency
            remote_ms = (
                model.predict_ttft_ms(pf, remote_uncached)
                + self.transfer_ms_per_ktok * request.prompt_tokens / 1000.0
                + self.hop_ms
            )
            local_ms = model.predict_ttft_ms(target, local_uncached)
            ms_per_token = 1000.0 / model.prefill_tokens_per_s(target, clock.now())
            # Prefilling locally stalls every stream decoding there for as long as it takes,
            # so the cost grows with the batch (counted per stream, the P/D scenarios' TPOT
            # and E2E follow it: bench/RESULTS.md). On a dedicated decode pod count one
            # stream even when idle: the decodes that arrive meanwhile are what it is for.
            streams = model.batch_size(target)
            if target.role == ROLE_DECODE:
                streams = max(1.0, streams)
            local_ms += self.stall_weight * streams * ms_per_token * local_uncached
            go = remote_ms < local_ms
            reason = "remote-faster" if go else "local-faster"
            result.pd = PDDecision(
                go, reason, local_uncached, remote_uncached, round(local_ms, 3),
                round(remote_ms, 3),
            )  # fmt: skip
        else:
            go = True
            reason = "always" if self.policy == "always" else "over-threshold"
            result.pd = PDDecision(True, reason, local_uncached, remote_uncached)
        if go:
            result.prefill = pf
            result.profiles[self.prefill_profile] = prefill
            result.uncached_tokens = remote_uncached
        return result
