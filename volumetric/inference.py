"""Inference: a checkpoint ready to use, and scans → predictions → CSV.

    load_model("best.pt")          the model in eval mode, its class names, its preprocessing
    Predictor("best.pt")(scan)     one scan (a path, a numpy array with its affine, or a TorchIO
                                   image) → a Prediction; raises VolumetricError on a bad scan
    predict_to_csv(...)            many scans → one CSV row each; a scan that fails gets a row
                                   with its error and the others are unaffected, and so does an
                                   input that gave no scan (volumetric-infer)

Everything comes from the checkpoint: the model, its classes and the preprocessing. Scans of any
size run (the position embedding follows the token grid).

Options of `Predictor`:

- ``tta=N`` (test-time augmentation): N random label-preserving views of each preprocessed scan
  (`volumetric.transforms.tta`) are classified besides the scan itself; ``probs`` is then the
  mean over the N + 1 passes and ``probs_std`` their standard deviation (sample std, N degrees of
  freedom). The views are drawn from ``seed`` anew for every scan, so a scan gets the same views
  whatever else is classified, and a rerun the same numbers.
- ``explain=True`` (relevance maps): gradient × input on the patch tokens for the predicted class,
  the gradient averaged over ``map_steps`` points of a path from an empty scan
  (`volumetric.explain.relevance`), on the input scan's grid. Only the unaugmented pass is
  explained.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch
import torchio as tio
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from volumetric.atomic_files import atomic_write_csv
from volumetric.checkpoint import load_checkpoint
from volumetric.data.dataset import check_volume, preprocess_scan, read_scan
from volumetric.data.discovery import Unusable
from volumetric.data.guard import ScanGuard, UnknownModalityWarning
from volumetric.data.loading import resolve_workers
from volumetric.data.series_filter import SeriesFilter
from volumetric.data.source import ScanSource
from volumetric.device import autocast, autocast_dtype, resolve_device
from volumetric.ensemble import MeanOfMembers, check_members, ensemble_decision, expand
from volumetric.errors import VolumetricError, first_line
from volumetric.evaluation.decision import ARGMAX, Decision
from volumetric.evaluation.rows import PredictionTable
from volumetric.explain.relevance import STEPS, RelevanceMap, relevance_map
from volumetric.explain.save import map_names, save_relevance
from volumetric.models.registry import ArchitectureSpec, architecture
from volumetric.transforms import build_preprocessing
from volumetric.transforms.tta import build_tta

if TYPE_CHECKING:
    from volumetric.models.vit3d import VolumeTransformer

log = logging.getLogger(__name__)

Scan = str | Path | ScanSource | np.ndarray | torch.Tensor | tio.Image
"""What `Predictor` classifies: a scan file or DICOM folder, a `ScanSource` (e.g. one image per
channel), a (W, H, D) or (C, W, H, D) array with its 4×4 voxel-to-world affine (RAS, mm), or a
TorchIO image."""


@dataclass
class LoadedModel:
    """A checkpoint ready to use (`load_model`): everything it takes to classify a scan."""

    model: nn.Module  # eval mode, on ``device``
    class_names: list[str]  # in logit order
    preprocessing: tio.Compose  # the deterministic pipeline the model was trained behind
    settings: dict[str, Any]  # what ``preprocessing`` was built from: data section + patch_size
    in_channels: int
    arch: str
    config: dict[str, Any]  # the training run's resolved config
    path: Path
    device: torch.device
    dtype: torch.dtype | None  # autocast dtype; None: float32
    training_groups: dict[str, Any] | None = None  # hashed groups of the training split
    decision: Decision = ARGMAX  # operating point and temperature (evaluation/decision.py)
    guard: ScanGuard = ScanGuard()  # series filter and modalities of training (data/guard.py)
    members: list[Path] = field(
        default_factory=list
    )  # an ensemble's checkpoints (volumetric/ensemble.py)

    @property
    def ensemble(self) -> bool:
        return len(self.members) > 1

    @property
    def spec(self) -> ArchitectureSpec:
        """The architecture's registry entry: what the model supports."""
        return architecture(self.arch)

    @property
    def channels(self) -> list[str] | None:
        """The manifest columns the model reads its channels from (None: one image per scan)."""
        return (self.config.get("data") or {}).get("channels")

    def preprocess(self, image: tio.Image, source: str | Path = "scan") -> tio.Subject:
        """The Subject whose ``image`` is the (C, W, H, D) float32 tensor the model takes."""
        return preprocess_scan(source, image, self.preprocessing, self.in_channels)

    @torch.no_grad()
    def passes(self, volume: torch.Tensor) -> torch.Tensor:
        """(B, C, W, H, D) preprocessed volumes → (M, B, num_classes) class probabilities of each
        of the M members (one for a single checkpoint), on the CPU."""
        with autocast(self.device, self.dtype):
            volume = volume.to(self.device)
            if isinstance(self.model, MeanOfMembers):
                return self.model.member_probs(volume).cpu()
            logits = self.model(volume)  # (B, num_classes)
        return self.decision.calibrate(logits)[None].cpu()

    def probabilities(self, volume: torch.Tensor) -> torch.Tensor:
        """(B, C, W, H, D) preprocessed volumes → (B, num_classes) class probabilities on the CPU
        (an ensemble's: the mean over its members)."""
        return self.passes(volume).mean(dim=0)


def load_model(
    checkpoint: str | Path | Sequence[str | Path],
    *,
    device: str = "auto",
    precision: str = "auto",
    allow_modality_mismatch: bool = False,
) -> LoadedModel:
    """Load a checkpoint written by volumetric-train (any format version) for inference; several
    checkpoints, or the folder of a --folds run, load as one ensemble (volumetric/ensemble.py).
    ``allow_modality_mismatch``: score scans of another modality than training's (data/guard.py)."""
    given = [checkpoint] if isinstance(checkpoint, (str, Path)) else list(checkpoint)
    paths, folds_decision = expand(given)
    members = [load_checkpoint(path) for path in paths]
    check_members(members)
    state = members[0]
    run_device = resolve_device(device)
    settings = state.preprocessing
    if len(members) == 1:
        model, decision = state.build_model(), Decision.from_dict(state.decision)
    else:
        temperatures = [Decision.from_dict(m.decision).temperature for m in members]
        model = MeanOfMembers([m.build_model() for m in members], temperatures).eval()
        decision = ensemble_decision(members, folds_decision)
    return LoadedModel(
        model=model.to(run_device),
        class_names=state.class_names,
        preprocessing=build_preprocessing(settings, settings["patch_size"]),
        settings=dict(settings),
        in_channels=state.in_channels,
        arch=state.arch if len(members) == 1 else f"ensemble of {len(members)} ({state.arch})",
        config=state.config,
        path=Path(given[0]),
        device=run_device,
        dtype=autocast_dtype(run_device, precision),
        training_groups=state.training_groups,
        decision=decision,
        members=paths,
        guard=ScanGuard(
            SeriesFilter.from_config((state.config.get("data") or {}).get("series_filter")),
            tuple(sorted({m for member in members for m in member.modalities})),
            allow_modality_mismatch,
        ),
    )


@dataclass
class Prediction:
    source: str  # the scan's path, or what was given instead of one
    class_names: list[str] = field(repr=False)
    probs: list[float]  # one per class (mean over TTA passes)
    probs_std: list[float] = field(default_factory=list)  # spread over passes; empty with one
    relevance: RelevanceMap | None = field(default=None, repr=False)  # with explain=True
    decision: Decision = field(default=ARGMAX, repr=False)  # the model's operating point

    @property
    def prediction(self) -> str:
        """The predicted class name (by the model's operating point)."""
        return self.class_names[int(self.decision.predict(np.asarray([self.probs]))[0])]


@dataclass(frozen=True)
class PredictionError:
    """A scan, or an input that gave none, without a prediction: its name and the reason, which
    its CSV row's error column holds (a VolumetricError's message names the scan already)."""

    source: str
    reason: str


def as_image(scan: Scan, affine: np.ndarray | None = None) -> tuple[tio.ScalarImage, str]:
    """The scan as a checked, loaded TorchIO image, and a name for messages and CSV rows."""
    if isinstance(scan, (str, Path, ScanSource)):
        source = ScanSource.of(scan)
        return read_scan(source), str(source)
    if isinstance(scan, tio.Image):
        name = str(scan.path) if scan.path is not None else "image"
        return check_volume(tio.ScalarImage(tensor=scan.data, affine=scan.affine), name), name
    if isinstance(scan, (np.ndarray, torch.Tensor)):
        if affine is None:
            raise VolumetricError(
                "an array needs its affine (4×4, voxel to world in mm): predictor(array, affine=A)"
            )
        data = torch.as_tensor(np.asarray(scan, dtype=np.float32))
        if data.dim() == 3:
            data = data[None]  # (1, W, H, D)
        if data.dim() != 4:
            raise VolumetricError(
                f"an array scan must be (W, H, D) or (C, W, H, D), got {tuple(data.shape)}"
            )
        affine = np.asarray(affine, dtype=np.float64)
        if affine.shape != (4, 4):
            raise VolumetricError(f"affine must be 4×4, got {affine.shape}")
        return check_volume(tio.ScalarImage(tensor=data, affine=affine), "array"), "array"
    raise VolumetricError(
        f"cannot classify a {type(scan).__name__}: give a path, an array or a TorchIO image"
    )


class Predictor:
    """A checkpoint ready to classify scans: ``Predictor("best.pt")(scan) -> Prediction``.

    ``checkpoint``: a path, several (an ensemble, volumetric/ensemble.py), or a `LoadedModel`
    already loaded. ``tta``: augmented passes per scan
    (0: off), their views drawn from ``seed``; ``map_steps``: gradient evaluations per relevance
    map (``explain=True``), 1 for plain gradient × input.
    """

    def __init__(
        self,
        checkpoint: str | Path | Sequence[str | Path] | LoadedModel,
        *,
        device: str = "auto",
        precision: str = "auto",
        tta: int = 0,
        seed: int = 0,
        map_steps: int = STEPS,
        allow_modality_mismatch: bool = False,
    ):
        if isinstance(tta, bool) or not isinstance(tta, int) or tta < 0:
            raise VolumetricError(
                f"tta must be a number of augmented passes, 0 or more, got {tta!r}"
            )
        if isinstance(map_steps, bool) or not isinstance(map_steps, int) or map_steps < 1:
            raise VolumetricError(
                f"map_steps must be 1 (plain gradient × input) or more, got {map_steps!r}"
            )
        if not isinstance(checkpoint, LoadedModel):
            checkpoint = load_model(
                checkpoint,
                device=device,
                precision=precision,
                allow_modality_mismatch=allow_modality_mismatch,
            )
        self.loaded = checkpoint
        self.tta, self.seed, self.map_steps = tta, seed, map_steps
        self.unknown_modality = UnknownModalityWarning(checkpoint.guard.modalities)
        try:
            self.views = build_tta(checkpoint.config.get("augment")) if tta else None
        except VolumetricError as error:
            raise VolumetricError(f"{checkpoint.path}: {error}") from None
        spread = tta > 0 or checkpoint.ensemble  # over TTA views, members, or both
        self.table = PredictionTable(
            checkpoint.class_names, with_std=spread, with_error=True, decision=checkpoint.decision
        )

    @property
    def model(self) -> nn.Module:
        return self.loaded.model

    @property
    def class_names(self) -> list[str]:
        return self.loaded.class_names

    def check_explainable(self) -> None:
        """Relevance maps need one token model; a VolumetricError for any other architecture and
        for an ensemble."""
        if self.loaded.ensemble:
            raise VolumetricError(
                f"relevance maps explain one model: give one checkpoint, not an ensemble of "
                f"{len(self.loaded.members)}"
            )
        if not self.loaded.spec.tokens:
            raise VolumetricError(
                f"{self.loaded.path}: relevance maps need a vit3d checkpoint (or another model "
                f"of patch tokens), this model is a {self.loaded.arch}"
            )

    def __call__(
        self, scan: Scan, *, affine: np.ndarray | None = None, explain: bool = False
    ) -> Prediction:
        """Classify one scan (with TTA when set up); ``explain=True`` adds its relevance map.
        Raises VolumetricError when the scan cannot be read or preprocessed."""
        if explain:
            self.check_explainable()
        if isinstance(scan, (str, Path, ScanSource)):  # arrays and images carry no modality
            refused, modality = self.loaded.guard.check(ScanSource.of(scan))
            if refused:
                raise VolumetricError(refused)
            if modality is None:
                self.unknown_modality(scan)
        original, source = as_image(scan, affine)
        subject = self.loaded.preprocess(original, source)
        if explain:
            return self._explained(subject, source, original)
        return self.classify([(subject, source)])[0]

    def classify(self, subjects: list[tuple[tio.Subject, str]]) -> list[Prediction]:
        """Preprocessed subjects of one shape, with their sources → their predictions: one
        forward pass for all of them, plus each one's TTA views."""
        images = torch.stack([subject.image.data.float() for subject, _ in subjects])
        plain = self.loaded.passes(images)  # (M, B, num_classes)
        return [
            self._prediction(source, plain[:, i], self._augmented_probs(subject))
            for i, (subject, source) in enumerate(subjects)
        ]

    def _prediction(
        self,
        source: str,
        plain: torch.Tensor,
        views: torch.Tensor,
        relevance: RelevanceMap | None = None,
    ) -> Prediction:
        """From the (M, num_classes) probabilities of the scan (one row per member) and
        (M·tta, num_classes) of its views: their mean and, over more than one pass, their sample
        standard deviation."""
        passes = torch.cat([plain, views])  # (M·(1 + tta), num_classes)
        decision = self.loaded.decision
        if len(passes) == 1:
            probs = passes[0].tolist()
            return Prediction(
                source, self.class_names, probs, relevance=relevance, decision=decision
            )
        mean, std = passes.mean(dim=0).tolist(), passes.std(dim=0).tolist()
        return Prediction(source, self.class_names, mean, std, relevance, decision)

    def _explained(
        self, subject: tio.Subject, source: str, original: tio.ScalarImage
    ) -> Prediction:
        """The prediction with the relevance map of the class it names (unaugmented pass)."""
        loaded = self.loaded
        views = self._augmented_probs(subject)  # (tta, num_classes): one member

        def final_class(logits: torch.Tensor) -> int:  # the class the prediction will name
            plain = loaded.decision.calibrate(logits).cpu()  # (1, num_classes)
            mean = torch.cat([plain, views]).mean(dim=0, keepdim=True).numpy()
            return int(loaded.decision.predict(mean)[0])

        image = subject.image.data.float().unsqueeze(0).to(loaded.device)  # (1, C, W, H, D)
        with autocast(loaded.device, loaded.dtype):
            logits, relevance = relevance_map(
                # check_explainable: the model has VolumeTransformer's token interface
                cast("VolumeTransformer", self.model),
                image,
                subject.image.affine,
                original,
                target=final_class,
                steps=self.map_steps,
            )
        plain = loaded.decision.calibrate(logits).cpu()  # (1, num_classes)
        return self._prediction(source, plain, views, relevance)

    def _augmented_probs(self, subject: tio.Subject) -> torch.Tensor:
        """(M·tta, num_classes) probabilities of ``self.tta`` random views of the preprocessed
        subject by each of the M members, the views drawn from ``self.seed`` (TorchIO draws from
        torch's global RNG, which is forked here and restored)."""
        probs = [torch.zeros(0, len(self.class_names))]
        views = cast(tio.Compose, self.views)  # set whenever self.tta > 0
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            for _ in range(self.tta):
                view = views(subject).image.data.float().unsqueeze(0)  # (1, C, W, H, D)
                probs.append(self.loaded.passes(view)[:, 0])  # (M, num_classes)
        return torch.cat(probs)


SCAN_FAILURES = (VolumetricError, RuntimeError, ValueError)
"""What costs one scan its row, not the whole run: a bad scan, or a library's error on it (e.g.
out of memory on a huge scan)."""


def failure_message(scan: str | Path | ScanSource, error: Exception) -> str:
    """The error column of a failed scan: a VolumetricError names its scan already; a library's
    error gets the scan's name and its first line."""
    if isinstance(error, VolumetricError):
        return str(error)
    return f"{scan}: {first_line(error)}"


class _Prepared(Dataset):
    """Scan i checked by the model's guard, read and preprocessed (in a DataLoader worker): its
    tensor, affine and modality, or its error."""

    def __init__(self, scans: list[ScanSource | Unusable], loaded: LoadedModel):
        self.scans, self.preprocessing = scans, loaded.preprocessing
        self.in_channels, self.guard = loaded.in_channels, loaded.guard

    def __len__(self) -> int:
        return len(self.scans)

    def __getitem__(self, index: int) -> dict[str, Any]:
        scan = self.scans[index]
        if isinstance(scan, Unusable):
            return {"index": index, "error": scan.error}
        try:
            refused, modality = self.guard.check(ScanSource.of(scan))
            if refused:
                return {"index": index, "error": refused}
            original, source = as_image(scan)
            subject = preprocess_scan(source, original, self.preprocessing, self.in_channels)
        except SCAN_FAILURES as error:
            return {"index": index, "error": failure_message(scan, error)}
        image = subject.image  # (C, W, H, D)
        data = {"data": image.data, "affine": image.affine, "modality": modality}
        return {"index": index, "error": "", **data}


def _as_is(item: dict[str, Any]) -> dict[str, Any]:
    return item


def predict_to_csv(
    predictor: Predictor,
    scans: list[ScanSource | Unusable],
    output: Path,
    *,
    progress: bool = True,
    maps: Path | None = None,
    num_workers: int | str = "auto",
    batch_size: int = 8,
) -> list[Prediction | PredictionError]:
    """Classify every scan and write the CSV atomically; returns, per scan, its Prediction or
    its PredictionError. ``scans`` as `inference_inputs` gives them: an `Unusable` input (one that
    gave no scan) gets the row of a failed scan, with its error, in its place.

    ``num_workers`` processes read and preprocess scans ahead of the model, and consecutive scans
    of one shape go through it ``batch_size`` at a time. With ``maps``, each scan is explained in
    turn and its relevance map (NIfTI and PNG) written as soon as it is computed; a scan that
    fails gets none.
    """
    if maps is not None:
        return _predict_with_maps(predictor, scans, output, Path(maps), progress)
    dataset = _Prepared(scans, predictor.loaded)
    workers = resolve_workers(num_workers)
    # batch_size=None: collate_fn takes one item, not the list its annotation says
    collate = cast("Callable[[list[Any]], Any]", _as_is)
    loader = DataLoader(dataset, batch_size=None, num_workers=workers, collate_fn=collate)
    results: list[Prediction | PredictionError] = [PredictionError("", "")] * len(scans)
    pending: list[tuple[int, tio.Subject, str]] = []  # consecutive scans of one shape
    for item in tqdm(loader, total=len(scans), desc="infer", disable=not progress):
        index = item["index"]
        if item["error"]:
            results[index] = PredictionError(str(_source(scans[index])), item["error"])
            continue
        if item["modality"] is None:
            predictor.unknown_modality(scans[index])
        subject = tio.Subject(image=tio.ScalarImage(tensor=item["data"], affine=item["affine"]))
        if pending and (len(pending) == batch_size or _shape(pending[-1][1]) != _shape(subject)):
            _classify(predictor, pending, results)
        pending.append((index, subject, str(scans[index])))
    _classify(predictor, pending, results)
    _write_csv(predictor, scans, results, output)
    return results


def _shape(subject: tio.Subject) -> tuple[int, ...]:
    return tuple(subject.image.data.shape)


def _classify(
    predictor: Predictor,
    pending: list[tuple[int, tio.Subject, str]],
    results: list[Prediction | PredictionError],
) -> None:
    """Classify the pending scans into ``results``, then empty ``pending``. A failing batch is
    retried scan by scan, so that one scan's failure (e.g. out of memory) is that scan's alone."""
    if not pending:
        return
    try:
        predictions = predictor.classify([(subject, source) for _, subject, source in pending])
    except SCAN_FAILURES as error:
        if len(pending) > 1:
            for one in pending:
                _classify(predictor, [one], results)
        else:
            index, _, source = pending[0]
            results[index] = PredictionError(source, failure_message(source, error))
    else:
        for (index, _, _), prediction in zip(pending, predictions):
            results[index] = prediction
    pending.clear()


def _predict_with_maps(
    predictor: Predictor,
    scans: list[ScanSource | Unusable],
    output: Path,
    maps: Path,
    progress: bool,
) -> list[Prediction | PredictionError]:
    """One scan at a time: the relevance map needs the scan as read, beside its prediction."""
    predictor.check_explainable()
    usable = [i for i, scan in enumerate(scans) if not isinstance(scan, Unusable)]
    usable_scans = cast("list[ScanSource]", [scans[i] for i in usable])
    names = dict(zip(usable, map_names(usable_scans)))  # index → map name
    results: list[Prediction | PredictionError] = []
    for index, scan in enumerate(tqdm(scans, desc="infer", disable=not progress)):
        try:
            unusable = isinstance(scan, Unusable)
            result: Prediction | PredictionError = (
                PredictionError(str(scan.source), scan.error)
                if unusable
                else predictor(scan, explain=True)
            )
        except SCAN_FAILURES as error:
            result = PredictionError(str(scan), failure_message(scan, error))
        if isinstance(result, Prediction):
            _save_map(predictor, result, maps, names[index])
        results.append(result)
    _write_csv(predictor, scans, results, output)
    return results


def _source(scan: ScanSource | Unusable | str | Path) -> ScanSource | str | Path:
    """What names a row: the scan, or the input that gave none."""
    return scan.source if isinstance(scan, Unusable) else scan


def _write_csv(
    predictor: Predictor,
    scans: list[ScanSource | Unusable],
    results: list[Prediction | PredictionError],
    output: Path,
) -> None:
    rows = []
    for scan, result in zip(map(_source, scans), results):
        if isinstance(result, PredictionError):
            log.error("%s", result.reason)
            rows.append(predictor.table.row(scan, error=result.reason))
        else:
            rows.append(predictor.table.row(scan, result.probs, probs_std=result.probs_std))
    atomic_write_csv(output, predictor.table.header(), rows)


def _save_map(predictor: Predictor, prediction: Prediction, maps: Path, name: str) -> None:
    """Write one scan's relevance map, then drop it: every map kept would fill the memory."""
    relevance = prediction.relevance
    assert relevance is not None  # explain=True gives every prediction its map
    try:
        save_relevance(relevance, maps, name, predictor.class_names[relevance.target])
    except OSError as error:  # the output folder, not the scan: every other scan would fail alike
        raise VolumetricError(
            f"{maps}: cannot write relevance maps ({error.strerror or error})"
        ) from None
    prediction.relevance = None
