"""Checkpoints: model architecture + weights (+ optimizer state), written atomically."""

from __future__ import annotations

import os
import pickle
import tempfile
from typing import Any

import torch

from fastflow.models import NICE, FlowModel, Glow, RealNVP

__all__ = ["save_checkpoint", "load_checkpoint", "build_model"]

RUNTIME_OPTIONS = ("reversible",)
MODEL_CLASSES: dict[str, type[FlowModel]] = {"Glow": Glow, "RealNVP": RealNVP, "NICE": NICE}


def build_model(name: str, config: dict[str, Any]) -> FlowModel:
    """Construct a model of class ``name`` from its ``config``."""
    if name not in MODEL_CLASSES:
        raise ValueError(f"unknown model class {name!r}; expected one of {sorted(MODEL_CLASSES)}")
    return MODEL_CLASSES[name](**config)


def _architecture(config: dict[str, Any]) -> dict[str, Any]:
    """The config without run-time switches (``reversible``) that leave the parameters unchanged."""
    return {k: v for k, v in config.items() if k not in RUNTIME_OPTIONS}


def save_checkpoint(
    path: str | os.PathLike[str],
    model: FlowModel,
    optimizer: torch.optim.Optimizer | None = None,
    **extra: Any,
) -> None:
    """Write ``{model class, config, state_dict, optimizer state, extra}`` to ``path`` via a temporary file
    in the same folder and an atomic rename, so a run killed mid-write leaves the previous file intact."""
    payload = {
        "model_class": type(model).__name__,
        "config": model.config,
        "state_dict": model.state_dict(),
        "optimizer": None if optimizer is None else optimizer.state_dict(),
        "extra": extra,
    }
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".ckpt-", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_checkpoint(
    path: str | os.PathLike[str], model: FlowModel | None = None, map_location: str | torch.device = "cpu"
) -> tuple[FlowModel, dict[str, Any]]:
    """Load ``path``; build the model from the stored config, or load into ``model`` after checking that its
    architecture matches (``ValueError`` naming the file otherwise). Returns ``(model, payload)``."""
    try:
        payload = torch.load(path, map_location=map_location, weights_only=False)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as err:
        raise ValueError(f"cannot read checkpoint {os.fspath(path)!r}: {err}") from err
    if not isinstance(payload, dict) or "state_dict" not in payload or "config" not in payload:
        raise ValueError(f"{os.fspath(path)!r} is not a fastflow checkpoint")
    if model is None:
        model = build_model(payload["model_class"], payload["config"])
    elif type(model).__name__ != payload["model_class"] or _architecture(model.config) != _architecture(
        payload["config"]
    ):
        raise ValueError(
            f"checkpoint {os.fspath(path)!r} holds a {payload['model_class']} with config {payload['config']}, "
            f"which does not match the {type(model).__name__} with config {model.config}"
        )
    model.load_state_dict(payload["state_dict"])
    return model, payload
