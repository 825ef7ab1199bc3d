"""The run folder: what `dare train` writes and `dare export` / evaluation read back.

    config.json    TrainConfig.to_dict(), including the ModelConfig the model is rebuilt from
    model.pt       the model's state_dict (torch.save); read back with torch.load(weights_only=True) only
    metrics.json   whatever the trainer measured (its keys are the trainer's business)
    vocab.npz      copied from the prepared-data folder: raw id -> row maps the export ships to the service
    data.json      the data fingerprint (from the data folder's meta.json) and where the data came from
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dare_common import DareError
from service.contract import VOCAB_ARRAYS, VOCAB_FILE
from training.config import MODEL_KINDS, MODEL_VERSION, ModelConfig, TrainConfig
from training.model import CTRModel, build_model

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.pt"
METRICS_FILE = "metrics.json"
DATA_FILE = "data.json"
META_FILE = "meta.json"
# The data package's meta.json names its fingerprint one of these (first found wins).
FINGERPRINT_KEYS = ("data_fingerprint", "fingerprint")


class RunFolderError(DareError):
    """A run folder is missing a file, holds a corrupt one, or its weights do not match its config."""


@dataclass(frozen=True)
class LoadedRun:
    model: CTRModel  # in eval mode
    train_cfg: TrainConfig
    metrics: dict[str, Any]
    data_fingerprint: str
    path: Path

    @property
    def vocab_path(self) -> Path:
        return self.path / VOCAB_FILE


def _read_json(path: Path, what: str) -> Any:
    if not path.is_file():
        raise RunFolderError(f"{path.parent}: no {path.name} ({what}); is this a folder written by `dare train`?")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RunFolderError(f"{path}: not valid JSON: {exc}") from None


def data_fingerprint(data_dir: Path) -> str:
    """The fingerprint recorded in a prepared-data folder's meta.json."""
    meta = _read_json(Path(data_dir) / META_FILE, "the prepared data's description")
    if isinstance(meta, dict):
        for key in FINGERPRINT_KEYS:
            if isinstance(meta.get(key), str) and meta[key]:
                return meta[key]
    raise RunFolderError(f"{Path(data_dir) / META_FILE}: no data fingerprint (expected one of {FINGERPRINT_KEYS})")


def train_config_from_dict(raw: Any, source: Path) -> TrainConfig:
    """Rebuild a TrainConfig from config.json, naming the field that is wrong."""
    if not isinstance(raw, dict) or not isinstance(raw.get("model"), dict):
        raise RunFolderError(f"{source}: must hold a JSON object with a 'model' object")
    model_raw = dict(raw["model"])
    known_model = {f.name for f in fields(ModelConfig)}
    known_train = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(raw) - known_train) + sorted(f"model.{k}" for k in set(model_raw) - known_model)
    if unknown:
        raise RunFolderError(f"{source}: unknown config fields {unknown}")
    if model_raw.get("version") != MODEL_VERSION:
        raise RunFolderError(
            f"{source}: model version {model_raw.get('version', 1)!r}, this code trains and exports version {MODEL_VERSION} "
            "(2026-12: the MLP input became [v_t, p, v_t ⊙ p] and the score scales its semantic and position parts "
            "separately, as the authors' code does); the old weights cannot be rebuilt: retrain with `dare train`"
        )
    if model_raw.get("kind") not in MODEL_KINDS:
        raise RunFolderError(f"{source}: model.kind must be one of {MODEL_KINDS}, got {model_raw.get('kind')!r}")
    if "mlp_hidden" in model_raw:
        model_raw["mlp_hidden"] = tuple(model_raw["mlp_hidden"])
    try:
        model_cfg = ModelConfig(**model_raw)
        return TrainConfig(**{**raw, "model": model_cfg})
    except (TypeError, ValueError) as exc:
        raise RunFolderError(f"{source}: invalid config: {exc}") from None


def _check_vocab(path: Path, model_cfg: ModelConfig) -> None:
    """The vocabulary must have the documented arrays and map into the model's tables."""
    try:
        with np.load(path, allow_pickle=False) as vocab:
            missing = [name for name in VOCAB_ARRAYS if name not in vocab.files]
            if missing:
                raise RunFolderError(f"{path}: missing arrays {missing} (expected {VOCAB_ARRAYS})")
            for field, rows in (("item", model_cfg.item_rows), ("cate", model_cfg.cate_rows)):
                index = vocab[f"{field}_index"]
                if index.size and int(index.max()) >= rows:
                    raise RunFolderError(
                        f"{path}: {field}_index reaches row {int(index.max())} but the model has {rows} {field} rows"
                    )
    except (OSError, ValueError) as exc:
        raise RunFolderError(f"{path}: not a readable .npz vocabulary: {exc}") from None


def save_run(out_dir: Path, model: CTRModel, train_cfg: TrainConfig, metrics: dict[str, Any], data_dir: Path) -> Path:
    """Write the run folder (see the module docstring) and return its path."""
    out_dir, data_dir = Path(out_dir), Path(data_dir)
    if model.cfg != train_cfg.model:
        raise RunFolderError(f"save_run: the model was built from {model.cfg}, but the config says {train_cfg.model}")
    vocab_src = data_dir / VOCAB_FILE
    if not vocab_src.is_file():
        raise RunFolderError(f"{data_dir}: no {VOCAB_FILE}; is this a folder written by `dare prepare`?")
    fingerprint = data_fingerprint(data_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / CONFIG_FILE).write_text(json.dumps(train_cfg.to_dict(), indent=2) + "\n", encoding="utf-8")
    torch.save(model.state_dict(), out_dir / WEIGHTS_FILE)
    (out_dir / METRICS_FILE).write_text(json.dumps(metrics, indent=2, default=float) + "\n", encoding="utf-8")
    shutil.copyfile(vocab_src, out_dir / VOCAB_FILE)
    data = {"data_fingerprint": fingerprint, "data_dir": str(data_dir.resolve())}
    (out_dir / DATA_FILE).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    return out_dir


def load_run(run_dir: Path) -> LoadedRun:
    """Read a run folder back: rebuild the model from config.json, load model.pt (weights only), eval mode."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunFolderError(f"{run_dir}: not a directory (expected a run folder written by `dare train`)")
    train_cfg = train_config_from_dict(_read_json(run_dir / CONFIG_FILE, "the training config"), run_dir / CONFIG_FILE)
    metrics = _read_json(run_dir / METRICS_FILE, "the run's metrics")
    if not isinstance(metrics, dict):
        raise RunFolderError(f"{run_dir / METRICS_FILE}: must hold a JSON object")
    data = _read_json(run_dir / DATA_FILE, "the data fingerprint")
    if not isinstance(data, dict) or not isinstance(data.get("data_fingerprint"), str):
        raise RunFolderError(f"{run_dir / DATA_FILE}: must hold an object with a string 'data_fingerprint'")
    if not (run_dir / VOCAB_FILE).is_file():
        raise RunFolderError(f"{run_dir}: no {VOCAB_FILE} (the vocabulary copied from the data folder)")
    _check_vocab(run_dir / VOCAB_FILE, train_cfg.model)

    weights = run_dir / WEIGHTS_FILE
    if not weights.is_file():
        raise RunFolderError(f"{run_dir}: no {WEIGHTS_FILE} (the trained weights)")
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types (pickle, zip, runtime) for a damaged file
        raise RunFolderError(f"{weights}: cannot be read as a weights-only state_dict: {exc}") from None
    if not isinstance(state, dict):
        raise RunFolderError(f"{weights}: holds a {type(state).__name__}, expected a state_dict")
    model = build_model(train_cfg.model)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first_lines = " ".join(str(exc).split())[:400]
        raise RunFolderError(f"{weights}: does not match the model in {CONFIG_FILE}: {first_lines}") from None
    model.eval()
    return LoadedRun(model=model, train_cfg=train_cfg, metrics=metrics, data_fingerprint=data["data_fingerprint"], path=run_dir)
