"""`tokenizer`: the ecosystem's tokenizer plugin, accepted so its configs load.

The EPP tokenizes in-process with the model's files from `--tokenizer-dir` (no hub, no
sidecar), so this plugin only checks its parameters and says where tokens come from:
`modelName`, and llm-d's `udsTokenizerConfig` / `hf` / `local` sources (not used).
"""

from __future__ import annotations

import logging
from typing import Any

from pydantic import BaseModel, ConfigDict

from epp.scheduling.framework import Plugin

log = logging.getLogger(__name__)


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid")
    modelName: str | None = None
    udsTokenizerConfig: dict[str, Any] | None = None
    hf: dict[str, Any] | None = None
    local: dict[str, Any] | None = None


class TokenizerConfig(Plugin):
    type_name = "tokenizer"

    def configure(self) -> None:
        p = _Params.model_validate(dict(self.params))
        sources = [k for k in ("udsTokenizerConfig", "hf", "local") if getattr(p, k)]
        tokenizers = self.services.tokenizers
        model = p.modelName or ""
        tok = tokenizers.get(model) if tokenizers is not None else None
        if sources:
            log.info("%s: %s not used; the EPP tokenizes in-process from --tokenizer-dir",
                     self.name, ", ".join(sources))  # fmt: skip
        if tok is None:
            log.warning("%s: no --tokenizer-dir for model %r", self.name, model)
