"""Artifact URI -> volume, mount and the path the engine loads the model from.

- `hf://org/model[@revision]`: the engine downloads from Hugging Face into an emptyDir cache
  (`HF_HOME`); the model argument is `org/model`.
- `pvc://claim/sub/path`: the claim mounted read-only at /models; the model is /models/sub/path.
- `oci://registry/repo:tag`: an image volume (Kubernetes >= 1.31 `ImageVolume`) at /models.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

MOUNT_PATH = "/models"
VOLUME_NAME = "model"


@dataclass(frozen=True)
class Artifact:
    scheme: str
    model_path: str  # what the engine is told to load
    volume: dict[str, Any]
    mount: dict[str, Any]
    env: list[dict[str, str]] = field(default_factory=list)
    revision: str = ""


def resolve(uri: str) -> Artifact:
    """Map an artifact URI to its volume/mount/path. Raises ValueError on a bad URI."""
    scheme, sep, rest = uri.partition("://")
    rest = rest.strip("/")
    if not sep or not rest:
        raise ValueError(f"bad artifact uri {uri!r}")
    if scheme == "hf":
        repo, _, revision = rest.partition("@")
        if repo.count("/") != 1:
            raise ValueError(f"hf uri {uri!r} must be hf://org/model[@revision]")
        return Artifact(
            scheme="hf",
            model_path=repo,
            volume={"name": VOLUME_NAME, "emptyDir": {}},
            mount={"name": VOLUME_NAME, "mountPath": MOUNT_PATH},
            env=[{"name": "HF_HOME", "value": f"{MOUNT_PATH}/hf"}],
            revision=revision,
        )
    if scheme == "pvc":
        claim, _, sub = rest.partition("/")
        return Artifact(
            scheme="pvc",
            model_path=f"{MOUNT_PATH}/{sub}" if sub else MOUNT_PATH,
            volume={
                "name": VOLUME_NAME,
                "persistentVolumeClaim": {"claimName": claim, "readOnly": True},
            },
            mount={"name": VOLUME_NAME, "mountPath": MOUNT_PATH, "readOnly": True},
        )
    if scheme == "oci":
        return Artifact(
            scheme="oci",
            model_path=MOUNT_PATH,
            volume={
                "name": VOLUME_NAME,
                "image": {"reference": rest, "pullPolicy": "IfNotPresent"},
            },
            mount={"name": VOLUME_NAME, "mountPath": MOUNT_PATH, "readOnly": True},
        )
    raise ValueError(f"artifact uri {uri!r}: scheme must be hf, pvc or oci")
