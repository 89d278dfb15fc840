"""The end of a training run: the operating point and temperature of best.pt, fitted on the
validation split (train.positive_class, train.threshold, train.calibrate;
volumetric/evaluation/decision.py) and written into best.pt and last.pt."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.utils.data import DataLoader

from volumetric.checkpoint import load_checkpoint, write_decision
from volumetric.config import Config
from volumetric.data.loading import loader_options
from volumetric.errors import VolumetricError
from volumetric.evaluation.decision import Decision, fit_temperature, fit_threshold
from volumetric.evaluation.predict import predict

if TYPE_CHECKING:
    from volumetric.engine.setup import Run

log = logging.getLogger(__name__)


def wants_decision(config: Config) -> bool:
    t = config.train
    return t.positive_class is not None or t.threshold != "argmax" or t.calibrate


def positive_index(config: Config, class_names: list[str]) -> int:
    """The index of ``train.positive_class`` (the second class when it is not set)."""
    name = config.train.positive_class
    if name is None:
        return 1
    return class_names.index(name)


def check_decision_settings(config: Config, class_names: list[str], validation: int) -> None:
    """The operating-point settings against the data, before the first step: a positive class
    that is one of two classes, a threshold rule for two classes, and validation scans to fit on."""
    t = config.train
    if t.positive_class is not None and t.positive_class not in class_names:
        raise VolumetricError(
            f"train.positive_class={t.positive_class!r} is not one of the classes {class_names}"
        )
    if (t.positive_class is not None or t.threshold != "argmax") and len(class_names) != 2:
        raise VolumetricError(
            f"train.positive_class and train.threshold are for two classes, this data has "
            f"{len(class_names)} ({', '.join(class_names)})"
        )
    if (t.threshold != "argmax" or t.calibrate) and validation == 0:
        raise VolumetricError(
            f"train.threshold={t.threshold} and train.calibrate are fitted on validation scans; "
            "this run has none (give --val, or train.val_fraction above 0)"
        )


def fit_decision(run: Run) -> Decision | None:
    """Fit the operating point and temperature on the validation scans with best.pt's weights
    (every validation scan, in this process) and write them into best.pt and last.pt; None when
    the config asks for neither."""
    config = run.config
    if not wants_decision(config) or not run.best_path.exists():
        return None
    t = config.train
    run.model.load_state_dict(load_checkpoint(run.best_path, map_location=run.device).weights)
    # every validation scan, in order, in this process (under torchrun its val_loader is a shard)
    loader = DataLoader(run.val_set, batch_size=t.batch_size, **loader_options(0, False))
    found = predict(run.model, loader, run.device, run.dtype, desc="operating point")
    probs, labels = found.probs.double().numpy(), found.labels.numpy()
    temperature = fit_temperature(probs, labels) if t.calibrate else None
    if temperature is not None:
        logits = torch.as_tensor(np.log(np.clip(probs, 1e-12, 1.0)))
        probs = (logits / temperature).softmax(dim=1).numpy()
    positive = positive_index(config, run.class_names)
    threshold = None
    if len(run.class_names) == 2:
        threshold = fit_threshold(probs[:, positive], labels == positive, t.threshold)
    decision = Decision(positive, threshold, t.threshold, temperature)
    for path in (run.best_path, run.last_path):
        write_decision(path, decision.to_dict())
    shown = [f"positive class {run.class_names[positive]}" if len(run.class_names) == 2 else ""]
    shown += [f"threshold {threshold:.4f} ({t.threshold})" if threshold is not None else ""]
    shown += [f"temperature {temperature:.3f}" if temperature is not None else ""]
    log.info(
        "best.pt's operating point, fitted on %d validation scans: %s",
        len(labels),
        ", ".join(s for s in shown if s),
    )
    return decision
