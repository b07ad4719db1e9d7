"""Profile handlers: single profile, and prefill/decode disaggregation."""

from __future__ import annotations

from epp.datalayer.endpoint import ROLE_DECODE, Endpoint
from epp.scheduling.framework import ProfileHandler, ProfileRunner, SchedulingResult
from epp.scheduling.plugins.common import uncached_tokens
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
    least `threshold` tokens AND the predicted time to prefill remotely (prefill endpoint's
    queue + uncached work there + KV transfer + hop overhead) beats prefilling locally on
    the decode endpoint (its queue + uncached work + the stall it causes to the running
    decode batch). A multi-turn conversation whose history is cached on the decode pod has
    few uncached tokens and stays local; a long fresh prompt goes to an idle prefill pod.
    Parameters: decodeProfile (decode), prefillProfile (prefill), threshold (256 tokens),
    kvTransferMsPerKToken (1.0), hopOverheadMs (3.0), decodeStallWeight (0.5).
    """

    type_name = "pd-profile-handler"

    def configure(self) -> None:
        p = self.params
        self.decode_profile = str(p.get("decodeProfile", "decode"))
        self.prefill_profile = str(p.get("prefillProfile", "prefill"))
        self.threshold = int(p.get("threshold", 256))
        self.transfer_ms_per_ktok = float(p.get("kvTransferMsPerKToken", 1.0))
        self.hop_ms = float(p.get("hopOverheadMs", 3.0))
        self.stall_weight = float(p.get("decodeStallWeight", 0.5))

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
        local_uncached = uncached_tokens(cycle, self.services, request, target)
        result.uncached_tokens = local_uncached
        if local_uncached < self.threshold or not runner.has_profile(self.prefill_profile):
            return result
        prefill_candidates = [ep for ep in candidates if ep.can_prefill() and ep is not target]
        if not prefill_candidates:
            return result
        prefill = runner.run(self.prefill_profile, cycle, request, prefill_candidates)
        if prefill is None or not prefill.ranked:
            return result
        pf = prefill.ranked[0]
        model = self.services.latency
        remote_uncached = uncached_tokens(cycle, self.services, request, pf)
        remote_ms = (
            model.predict_ttft_ms(pf, remote_uncached)
            + self.transfer_ms_per_ktok * request.prompt_tokens / 1000.0
            + self.hop_ms
        )
        local_ms = model.predict_ttft_ms(target, local_uncached)
        rate = target.latency.prefill_ms_per_token or model.priors.prefill_ms_per_token
        # Prefilling locally stalls the decode batch running there for as long as it takes;
        # on a dedicated decode pod count it even when idle, since the decodes that arrive
        # meanwhile are what the pod is for.
        busy = model.batch_size(target) > 0 or target.role == ROLE_DECODE
        stall_ms = self.stall_weight * rate * local_uncached if busy else 0.0
        if remote_ms < local_ms + stall_ms:
            result.prefill = pf
            result.profiles[self.prefill_profile] = prefill
            result.uncached_tokens = remote_uncached
        return result
