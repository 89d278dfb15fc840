"""Inference: scans → one row each (path, prediction, prob_<class>..., error) → CSV.

Everything comes from the checkpoint: the model, its classes and the preprocessing. Scans of any
size run (the position embedding follows the token grid). A scan that cannot be read or
processed gets a row with its error and no prediction; the others are unaffected.

Options:

- ``tta=N`` (test-time augmentation): N random label-preserving views of each preprocessed scan
  (`transforms.tta`) are classified besides the scan itself; ``prob_<class>`` is then the mean
  over the N + 1 passes, and extra columns ``prob_std_<class>`` hold their standard deviation
  (sample std, N + 1 − 1 degrees of freedom). The views are drawn from ``seed`` anew for every
  scan, so a scan gets the same views whatever else is in the batch, and a rerun the same CSV.
- ``maps=DIR`` (relevance maps): gradient × input on the patch tokens for the predicted class,
  the gradient averaged over ``map_steps`` points of a path from an empty scan
  (`volumetric.explain.relevance`), written as DIR/<name>_relevance.nii.gz on the input scan's
  grid and DIR/<name>_relevance.png, a three-slice montage. Only the unaugmented pass is explained.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from transforms import build_preprocessing
from transforms.tta import build_tta
from volumetric.data.dataset import preprocess_scan, read_scan
from volumetric.device import autocast, autocast_dtype, resolve_device
from volumetric.engine.checkpoint import load_checkpoint, model_from_checkpoint
from volumetric.errors import VolumetricError, first_line
from volumetric.explain.relevance import STEPS, RelevanceMap, relevance_map
from volumetric.explain.save import map_names, save_relevance
from volumetric.io import atomic_write_csv
from volumetric.models.vit3d import VolumeTransformer

log = logging.getLogger(__name__)


@dataclass
class Prediction:
    path: Path
    probs: list[float] = field(
        default_factory=list
    )  # one per class (mean over TTA passes); empty when the scan failed
    error: str = ""
    probs_std: list[float] = field(
        default_factory=list
    )  # std over the TTA passes, one per class; empty without TTA
    relevance: RelevanceMap | None = field(
        default=None, repr=False
    )  # when asked for with explain=True


class Predictor:
    """A checkpoint ready to classify scans: ``Predictor(path)(scan) -> Prediction``.

    ``tta``: augmented passes per scan (0: off), their views drawn from ``seed``; ``map_steps``:
    gradient evaluations per relevance map (``explain=True``), 1 for plain gradient × input.
    """

    def __init__(
        self,
        checkpoint: str | Path,
        *,
        device: str = "auto",
        precision: str = "auto",
        tta: int = 0,
        seed: int = 0,
        map_steps: int = STEPS,
    ):
        if isinstance(tta, bool) or not isinstance(tta, int) or tta < 0:
            raise VolumetricError(
                f"tta must be a number of augmented passes, 0 or more, got {tta!r}"
            )
        if isinstance(map_steps, bool) or not isinstance(map_steps, int) or map_steps < 1:
            raise VolumetricError(
                f"map_steps must be 1 (plain gradient × input) or more, got {map_steps!r}"
            )
        state = load_checkpoint(checkpoint)
        self.checkpoint = Path(checkpoint)
        self.tta, self.seed, self.map_steps = tta, seed, map_steps
        try:
            self.views = build_tta((state.get("config") or {}).get("augment")) if tta else None
        except VolumetricError as error:
            raise VolumetricError(f"{checkpoint}: {error}") from None
        self.class_names: list[str] = state["class_names"]
        settings = state["preprocessing"]
        self.preprocess = build_preprocessing(settings, settings["patch_size"])
        self.device = resolve_device(device)
        self.dtype = autocast_dtype(self.device, precision)
        self.model = model_from_checkpoint(state, checkpoint).to(self.device)
        self.in_channels = state["model_args"].get("in_channels", 1)

    def check_explainable(self) -> None:
        """Relevance maps need the token model; a VolumetricError for any other architecture."""
        if not isinstance(self.model, VolumeTransformer):
            raise VolumetricError(
                f"{self.checkpoint}: relevance maps need a vit3d checkpoint, this model is a "
                f"{type(self.model).__name__}"
            )

    @torch.no_grad()
    def __call__(self, scan: Path, *, explain: bool = False) -> Prediction:
        """Classify one scan (with TTA when set up); ``explain=True`` adds its relevance map."""
        relevance = None
        try:
            original = read_scan(scan)
            subject = preprocess_scan(scan, original, self.preprocess, self.in_channels)
            probs = self._augmented_probs(subject)  # [(num_classes,)] × tta
            image = subject.image.data.float().unsqueeze(0).to(self.device)  # (1, C, W, H, D)
            with autocast(self.device, self.dtype):
                if explain:
                    self.check_explainable()

                    def final_class(logits: torch.Tensor) -> int:  # the class the row will name
                        return int(
                            torch.stack([*probs, logits.float().softmax(dim=1)[0].cpu()])
                            .mean(dim=0)
                            .argmax()
                        )

                    logits, relevance = relevance_map(
                        self.model,
                        image,
                        subject.image.affine,
                        original,
                        target=final_class,
                        steps=self.map_steps,
                    )
                else:
                    logits = self.model(image)  # (1, num_classes)
        except VolumetricError as error:
            return Prediction(scan, error=str(error))
        except (RuntimeError, ValueError) as error:  # e.g. out of memory on a huge scan
            return Prediction(scan, error=f"{scan}: {first_line(error)}")
        passes = torch.stack(
            [logits.float().softmax(dim=1)[0].cpu(), *probs]
        )  # (1 + tta, num_classes)
        if not self.tta:
            return Prediction(scan, probs=passes[0].tolist(), relevance=relevance)
        return Prediction(
            scan,
            probs=passes.mean(dim=0).tolist(),
            probs_std=passes.std(dim=0).tolist(),
            relevance=relevance,
        )

    def _augmented_probs(self, subject) -> list[torch.Tensor]:
        """Class probabilities (num_classes,) of ``self.tta`` random views of the preprocessed subject,
        drawn from ``self.seed`` (TorchIO draws from torch's global RNG, forked here and restored)."""
        probs: list[torch.Tensor] = []
        if not self.tta:
            return probs
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            for _ in range(self.tta):
                view = (
                    self.views(subject).image.data.float().unsqueeze(0).to(self.device)
                )  # (1, C, W, H, D)
                with autocast(self.device, self.dtype):
                    probs.append(self.model(view).float().softmax(dim=1)[0].cpu())
        return probs

    def header(self) -> list[str]:
        std = [f"prob_std_{name}" for name in self.class_names] if self.tta else []
        return ["path", "prediction", *(f"prob_{name}" for name in self.class_names), *std, "error"]

    def row(self, prediction: Prediction) -> list[str]:
        columns = len(self.class_names) * (2 if self.tta else 1)
        if prediction.error:
            return [str(prediction.path), "", *([""] * columns), prediction.error]
        best = max(range(len(prediction.probs)), key=prediction.probs.__getitem__)
        std = [f"{s:.6f}" for s in prediction.probs_std] if self.tta else []
        return [
            str(prediction.path),
            self.class_names[best],
            *(f"{p:.6f}" for p in prediction.probs),
            *std,
            "",
        ]


def predict_to_csv(
    predictor: Predictor,
    scans: list[Path],
    output: Path,
    *,
    progress: bool = True,
    maps: Path | None = None,
) -> list[Prediction]:
    """Classify every scan and write the CSV atomically; returns the predictions, failures included.

    With ``maps``, each scan that is classified also gets its relevance map (NIfTI and PNG) there,
    written as soon as it is computed; a scan that fails gets none.
    """
    if maps is not None:
        predictor.check_explainable()
        names = map_names(scans)
    predictions = []
    for index, scan in enumerate(tqdm(scans, desc="infer", disable=not progress)):
        prediction = predictor(scan, explain=maps is not None)
        if prediction.error:
            log.error("%s", prediction.error)
        if maps is not None and prediction.relevance is not None:
            name = predictor.class_names[prediction.relevance.target]
            try:
                save_relevance(prediction.relevance, Path(maps), names[index], name)
            except (
                OSError
            ) as error:  # the output folder, not the scan: every other scan would fail alike
                raise VolumetricError(
                    f"{maps}: cannot write relevance maps ({error.strerror or error})"
                ) from None
            prediction.relevance = None  # written; do not keep every map in memory
        predictions.append(prediction)
    atomic_write_csv(output, predictor.header(), [predictor.row(p) for p in predictions])
    return predictions
