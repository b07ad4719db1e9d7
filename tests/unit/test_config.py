"""Settings loading: --config-text/--config-file precedence and the standalone models file."""

from __future__ import annotations

from pathlib import Path

import pytest

from epp.config import ConfigFileError, load_models_file, load_picker_config_text
from epp.datalayer.datastore import Criticality, Datastore, TargetModel
from epp.scheduling.config import build_scheduler


def test_config_text_wins_over_file(tmp_path: Path) -> None:
    f = tmp_path / "epp.yaml"
    f.write_text("plugins: [{type: queue-scorer}]\n")
    assert load_picker_config_text(str(f), "plugins: []\n") == "plugins: []\n"
    assert load_picker_config_text(str(f), None) == "plugins: [{type: queue-scorer}]\n"
    assert load_picker_config_text(str(f), "") == f.read_text()
    assert load_picker_config_text(None, None) is None  # the built-in default


def test_missing_config_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigFileError, match="--config-file"):
        load_picker_config_text(str(tmp_path / "nope.yaml"), None)


def test_config_file_feeds_the_scheduler(tmp_path: Path) -> None:
    f = tmp_path / "epp.yaml"
    f.write_text("plugins: [{type: queue-scorer}, {type: random-picker}]\n")
    s = build_scheduler(load_picker_config_text(str(f), None))
    assert list(s.profiles) == ["default"]
    assert s.profiles["default"].picker is not None
    assert s.profiles["default"].picker.type_name == "random-picker"


MODELS = """
models:
- name: chat
  criticality: Critical
  targetModels: [{name: llama-a, weight: 80}, {name: llama-b, weight: 20}]
- name: batch-llm
  criticality: Sheddable
- name: plain
objectives:
- name: batch
  priority: -1
- name: interactive
"""


def test_models_file(tmp_path: Path) -> None:
    f = tmp_path / "models.yaml"
    f.write_text(MODELS)
    mf = load_models_file(str(f))
    infos = {i.name: i for i in mf.model_infos()}
    assert infos["chat"].criticality is Criticality.CRITICAL
    assert infos["chat"].target_models == (TargetModel("llama-a", 80), TargetModel("llama-b", 20))
    assert infos["batch-llm"].criticality is Criticality.SHEDDABLE
    assert infos["plain"].criticality is Criticality.STANDARD
    assert infos["plain"].target_models == ()
    assert len({i.source for i in infos.values()}) == 3  # distinct object keys
    assert {(o.name, o.priority) for o in mf.objective_list()} == {
        ("batch", -1),
        ("interactive", 0),
    }
    # and the datastore accepts them as-is
    ds = Datastore()
    ds.replace_models("file", mf.model_infos())
    ds.replace_objectives(mf.objective_list())
    info = ds.model("chat")
    assert info is not None and len(info.target_models) == 2
    objective = ds.objective("batch")
    assert objective is not None and objective.priority == -1


def test_empty_models_file(tmp_path: Path) -> None:
    f = tmp_path / "models.yaml"
    f.write_text("")
    mf = load_models_file(str(f))
    assert mf.model_infos() == [] and mf.objective_list() == []


@pytest.mark.parametrize(
    "text",
    [
        "models: [{name: a, criticality: Urgent}]\n",
        "models: [{name: a, targetModels: [{name: b, weight: -1}]}]\n",
        "models: [{name: a, targetModels: [{name: b, weight: heavy}]}]\n",
        "models: [{criticality: Critical}]\n",
        "models: [{name: a, colour: red}]\n",
        "servers: []\n",
        "objectives: [{name: x, priority: high}]\n",
        "models: [unclosed\n",
        "- a\n- b\n",
    ],
)
def test_bad_models_files(tmp_path: Path, text: str) -> None:
    f = tmp_path / "models.yaml"
    f.write_text(text)
    with pytest.raises(ConfigFileError, match="models-file"):
        load_models_file(str(f))


def test_missing_models_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigFileError):
        load_models_file(str(tmp_path / "absent.yaml"))
