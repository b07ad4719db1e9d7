"""Settings loading: the EndpointPickerConfig text and the standalone models file."""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from epp.api.errors import UserError
from epp.datalayer.datastore import Criticality, ModelInfo, Objective, TargetModel


class ConfigFileError(UserError):
    pass


def load_picker_config_text(config_file: str | None, config_text: str | None) -> str | None:
    """`--config-text` wins over `--config-file`; None means the built-in default."""
    if config_text:
        return config_text
    if config_file:
        try:
            return Path(config_file).read_text()
        except OSError as e:
            raise ConfigFileError(f"cannot read --config-file {config_file}: {e}") from e
    return None


class _Target(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    weight: int = Field(default=1, ge=0)


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    criticality: Criticality = Criticality.STANDARD
    targetModels: list[_Target] = Field(default_factory=list)


class _Objective(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    priority: int = 0


class ModelsFile(BaseModel):
    """Standalone stand-in for InferenceModel / InferenceObjective objects.

    models:
    - name: chat
      criticality: Critical        # Critical | Standard | Sheddable
      targetModels: [{name: llama-a, weight: 80}, {name: llama-b, weight: 20}]
    objectives:
    - name: batch
      priority: -1                 # negative = sheddable
    """

    model_config = ConfigDict(extra="forbid")
    models: list[_Model] = Field(default_factory=list)
    objectives: list[_Objective] = Field(default_factory=list)

    def model_infos(self) -> list[ModelInfo]:
        return [
            ModelInfo(
                name=m.name,
                criticality=m.criticality,
                target_models=tuple(TargetModel(t.name, t.weight) for t in m.targetModels),
                source=f"file/{m.name}",
                created=float(i),
            )
            for i, m in enumerate(self.models)
        ]

    def objective_list(self) -> list[Objective]:
        return [Objective(o.name, o.priority) for o in self.objectives]


def load_models_file(path: str) -> ModelsFile:
    try:
        raw = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ConfigFileError(f"cannot load --models-file {path}: {e}") from e
    try:
        return ModelsFile.model_validate(raw)
    except ValidationError as e:
        raise ConfigFileError(f"invalid --models-file {path}: {e}") from e
