"""Inference: scans → one row each (path, prediction, prob_<class>..., error) → CSV.

Everything comes from the checkpoint: the model, its classes and the preprocessing. Scans of any
size run (the position embedding follows the token grid). A scan that cannot be read or
processed gets a row with its error and no prediction; the others are unaffected.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from transforms import build_preprocessing
from volumetric.data.dataset import load_subject
from volumetric.device import autocast, autocast_dtype, resolve_device
from volumetric.engine.checkpoint import load_checkpoint, model_from_checkpoint
from volumetric.errors import VolumetricError
from volumetric.io import atomic_write_csv
from volumetric.models.vit3d import VolumeTransformer

log = logging.getLogger(__name__)


@dataclass
class Prediction:
    path: Path
    probs: list[float] = field(default_factory=list)  # one per class; empty when the scan failed
    error: str = ""


class Predictor:
    """A checkpoint ready to classify scans: ``Predictor(path)(scan) -> Prediction``."""

    def __init__(self, checkpoint: str | Path, *, device: str = "auto", precision: str = "auto"):
        state = load_checkpoint(checkpoint)
        self.class_names: list[str] = state["class_names"]
        settings = state["preprocessing"]
        self.preprocess = build_preprocessing(settings, settings["patch_size"])
        self.device = resolve_device(device)
        self.dtype = autocast_dtype(self.device, precision)
        self.model: VolumeTransformer = model_from_checkpoint(state, checkpoint).to(self.device)
        self.in_channels = state["model_args"].get("in_channels", 1)

    @torch.no_grad()
    def __call__(self, scan: Path) -> Prediction:
        try:
            subject = load_subject(scan, self.preprocess, self.in_channels)
            image = subject.image.data.float().unsqueeze(0).to(self.device)  # (1, C, W, H, D)
            with autocast(self.device, self.dtype):
                logits = self.model(image)  # (1, num_classes)
        except VolumetricError as error:
            return Prediction(scan, error=str(error))
        except (RuntimeError, ValueError) as error:  # e.g. out of memory on a huge scan
            return Prediction(scan, error=f"{scan}: {str(error).strip().splitlines()[0]}")
        return Prediction(scan, probs=logits.float().softmax(dim=1)[0].tolist())

    def header(self) -> list[str]:
        return ["path", "prediction", *(f"prob_{name}" for name in self.class_names), "error"]

    def row(self, prediction: Prediction) -> list[str]:
        if prediction.error:
            return [str(prediction.path), "", *([""] * len(self.class_names)), prediction.error]
        best = max(range(len(prediction.probs)), key=prediction.probs.__getitem__)
        return [str(prediction.path), self.class_names[best], *(f"{p:.6f}" for p in prediction.probs), ""]


def predict_to_csv(predictor: Predictor, scans: list[Path], output: Path, *, progress: bool = True) -> list[Prediction]:
    """Classify every scan and write the CSV atomically; returns the predictions, failures included."""
    predictions = []
    for scan in tqdm(scans, desc="infer", disable=not progress):
        prediction = predictor(scan)
        if prediction.error:
            log.error("%s", prediction.error)
        predictions.append(prediction)
    atomic_write_csv(output, predictor.header(), [predictor.row(p) for p in predictions])
    return predictions
