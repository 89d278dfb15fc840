"""report.html: an evaluation as one page a person can open, offline, in any browser.

    the run            checkpoint, classes, data, date, versions of volumetric / torch / Python
    metrics            metrics.json: accuracy, balanced accuracy, AUROC, its bootstrap 95% interval
    figures            confusion_matrix.png and roc.png (training: learning_curves.png, epoch table)
    per class          precision, recall, F1, support, AUROC; the confusion matrix as a table
    scans              one row per scan: path, truth, prediction, probabilities, wrong or not
                       (click a column header to sort)
    confident mistakes the K wrong scans with the highest probability for the class they were given,
                       each with its relevance montage (as `volumetric-infer --maps`) beside the
                       same slices of the scan alone; a model without maps shows the slices alone

`volumetric-evaluate` writes it beside metrics.json, `volumetric-train` into the run folder for
best.pt on the validation scans (volumetric/evaluation/evaluate.py). With ``anonymize`` the page
names no path (scans are numbered in data-set order) and shows no image of a scan.
"""

from __future__ import annotations

import io
import math
import platform
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from tqdm import tqdm

from volumetric.atomic_files import atomic_write_text
from volumetric.errors import VolumetricError
from volumetric.evaluation.report_html import (
    Cell,
    esc,
    figures,
    image,
    json_attribute,
    nav,
    note,
    numeric,
    page,
    section,
    table,
)
from volumetric.explain.montage import montage_figure
from volumetric.inference import (
    SCAN_FAILURES,
    LoadedModel,
    Predictor,
    Scan,
    as_image,
    failure_message,
)
from volumetric.version import __version__

if TYPE_CHECKING:
    from volumetric.evaluation.evaluate import Evaluation

REPORT_NAME = "report.html"
REPORT_CASES = 8
"""Confident mistakes shown by `volumetric-evaluate` (training: none unless asked)."""
REPORT_MAP_STEPS = 4
"""Gradient evaluations per map of a case: a quarter of `volumetric-infer --maps`'s 16, to bound
the cost (each is a forward and a backward pass)."""
LEFT_OUT = "left out (--anonymize)"


@dataclass(frozen=True)
class ReportOptions:
    """What goes into report.html: ``cases`` confident mistakes with their images, maps of
    ``map_steps`` gradient evaluations; ``anonymize``: no paths, no images of scans."""

    cases: int = REPORT_CASES
    map_steps: int = REPORT_MAP_STEPS
    anonymize: bool = False

    def __post_init__(self) -> None:
        if self.cases < 0:
            raise VolumetricError(f"--report-cases {self.cases}: give a number of scans, 0 or more")
        if self.map_steps < 1:
            raise VolumetricError(
                f"--report-map-steps {self.map_steps}: at least 1 gradient evaluation is needed"
            )


@dataclass
class TrainingRecord:
    """What a training run adds to its report: the metrics.csv rows and its folder."""

    history: list[dict[str, float]]
    best_epoch: int
    run_dir: Path
    source: str  # where the validation scans came from
    select: str = "balanced_accuracy"  # the validation metric that picked best.pt (train.select)


@dataclass
class Case:
    """One confident mistake: its row of the scans table and its images."""

    number: int  # 1-based, the scan's row in the data set's order
    name: str  # the scan's path
    truth: str
    prediction: str
    confidence: float  # probability of the predicted class
    images: list[tuple[str, bytes]]  # (caption, PNG)
    note: str = ""


# ------------------------------------------------------------------------------------ writing


def write_report(
    path: Path,
    evaluation: Evaluation,
    plots: dict[str, Path],
    options: ReportOptions,
    *,
    source: str,
    training: TrainingRecord | None = None,
    progress: bool = False,
) -> Path:
    """Draw the cases and write the page to ``path`` atomically. ``plots``: the PNG files of
    `write_plots` ("confusion_matrix", "roc"); ``source``: the data, as the user named it."""
    cases = gather_cases(evaluation, options, progress=progress)
    text = render_report(evaluation, plots, options, cases, source=source, training=training)
    atomic_write_text(Path(path), text)
    return Path(path)


def render_report(
    evaluation: Evaluation,
    plots: dict[str, Path],
    options: ReportOptions,
    cases: list[Case],
    *,
    source: str,
    training: TrainingRecord | None = None,
) -> str:
    """The whole page as a string."""
    metrics = evaluation.metrics
    links = [("run", "run"), ("metrics", "metrics"), ("plots", "plots")]
    links += [("training", "training")] if training else []
    links += [("per-class", "per class"), ("scans", "every scan"), ("cases", "mistakes")]
    parts = [
        nav(links),
        run_section(evaluation, source, options.anonymize, training),
        metrics_section(metrics),
        plots_section(plots),
        *([training_section(training)] if training else []),
        per_class_section(metrics),
        scans_section(evaluation, options.anonymize),
        cases_section(cases, options, mistakes=int(np.sum(wrong_scans(evaluation)))),
    ]
    kind = "training" if training else "evaluation"
    return page(f"volumetric {kind} report", parts)


# ----------------------------------------------------------------------------------- sections


def run_section(
    evaluation: Evaluation, source: str, anonymize: bool, training: TrainingRecord | None
) -> str:
    loaded = evaluation.loaded
    rows = [
        (
            "checkpoint",
            LEFT_OUT if anonymize else ", ".join(map(str, loaded.members or [loaded.path])),
        ),
        (
            "model",
            loaded.arch + (f" (ensemble of {len(loaded.members)})" if loaded.ensemble else ""),
        ),
        ("classes", ", ".join(loaded.class_names)),
        ("data", LEFT_OUT if anonymize else (training.source if training else source)),
        ("scans", str(len(evaluation.items))),
    ]
    if training:
        rows += [
            ("run folder", LEFT_OUT if anonymize else str(training.run_dir)),
            ("best epoch", f"{training.best_epoch} of {len(training.history)}"),
        ]
    rows += [
        ("date", datetime.now().astimezone().isoformat(sep=" ", timespec="seconds")),
        ("volumetric", __version__),
        ("torch", torch.__version__),
        ("Python", platform.python_version()),
        ("device", str(loaded.device)),
    ]
    return section("run", "The run", table(None, [(r, "") for r in rows], ident="run-table"))


METRIC_ROWS = [  # (metrics.json key, label, decimals)
    ("num_scans", "scans", 0),
    ("accuracy", "accuracy", 4),
    ("balanced_accuracy", "balanced accuracy (mean recall)", 4),
    ("auroc", "AUROC (macro, one vs rest)", 4),
    ("pr_auc", "PR-AUC (macro, one vs rest)", 4),
    ("loss", "loss (cross-entropy)", 4),
    ("brier", "Brier score", 4),
    ("ece", "expected calibration error", 4),
]


def metrics_section(metrics: dict) -> str:
    def value(key: str, digits: int) -> Cell:
        return numeric(metrics[key], digits, key=key, value=json_attribute(metrics[key]))

    ci = metrics["auroc_ci95"]
    interval = Cell(
        f"{ci[0]:.4f} – {ci[1]:.4f}" if ci else "—",
        "num",
        {"key": "auroc_ci95", "value": json_attribute(ci)},
    )
    rows: list[tuple[list[str | Cell], str]] = [
        ([label, value(key, digits), interval if key == "auroc" else ""], "")
        for key, label, digits in METRIC_ROWS
    ]
    boot = metrics["auroc_bootstrap"]
    explained = note(
        f"95% interval: percentile bootstrap over the {boot.get('unit', 'scan')}s, "
        f"{boot['used']} of {boot['resamples']} resamples usable (one missing a class is "
        f"skipped), seed {boot['seed']}."
    )
    why = [note(metrics["auroc_note"])] if metrics.get("auroc_note") else []
    return section(
        "metrics",
        "Metrics",
        table(["metric", "value", "95% interval"], rows, ident="metrics-table"),
        explained,
        *why,
        *(
            [operating_point_table(metrics["operating_point"])]
            if "operating_point" in metrics
            else []
        ),
        *([note(calibrated(metrics["temperature"]))] if metrics.get("temperature") else []),
    )


def calibrated(temperature: float) -> str:
    return (
        f"Probabilities are temperature-scaled (T = {temperature:.3f}, fitted on the validation "
        "split, train.calibrate): the model's logits are divided by T before the softmax."
    )


def operating_point_table(point: dict) -> str:
    """Sensitivity, specificity, PPV and NPV at the model's operating point, with intervals."""
    rows: list[tuple[list[str | Cell], str]] = []
    for key, label in [
        ("sensitivity", "sensitivity (recall of the positive class)"),
        ("specificity", "specificity"),
        ("ppv", "PPV (precision)"),
        ("npv", "NPV"),
    ]:
        ci = point[f"{key}_ci95"]
        interval = f"{ci[0]:.4f} – {ci[1]:.4f}" if ci else "—"
        rows.append(
            (
                [
                    label,
                    numeric(point[key], 4, key=key, value=json_attribute(point[key])),
                    interval,
                ],
                "",
            )
        )
    rule = point["rule"]
    how = "the arg max" if rule == "argmax" else f"{rule} on the validation split"
    return "\n".join(
        [
            note(
                f"Operating point: {point['positive_class']} is positive when its probability is "
                f"at least {point['threshold']:.4f} (chosen by {how})."
            ),
            table(
                ["at the operating point", "value", "95% interval"], rows, ident="operating-table"
            ),
        ]
    )


def plots_section(plots: dict[str, Path]) -> str:
    shown = [
        ("confusion_matrix", "confusion matrix"),
        ("roc", "ROC curves"),
        ("reliability", "reliability diagram"),
    ]
    parts = [image(plots[k].read_bytes(), alt, "plot") for k, alt in shown if k in plots]
    return section("plots", "Confusion matrix, ROC and calibration", figures(parts))


EPOCH_COLUMNS = [  # (metrics.csv column, header, decimals)
    ("epoch", "epoch", 0),
    ("lr", "learning rate", None),  # scientific notation, as in the training log
    ("train_loss", "train loss", 4),
    ("val_loss", "val loss", 4),
    ("val_accuracy", "val accuracy", 4),
    ("val_balanced_accuracy", "val balanced accuracy", 4),
    ("val_auroc", "val AUROC", 4),
    ("seconds", "seconds", 1),
]


def training_section(training: TrainingRecord) -> str:
    curves = training.run_dir / "learning_curves.png"
    parts = [image(curves.read_bytes(), "learning curves", "plot")] if curves.exists() else []
    rows = [
        (
            [epoch_cell(row.get(key), digits) for key, _, digits in EPOCH_COLUMNS],
            "best" if int(row["epoch"]) == training.best_epoch else "",
        )
        for row in training.history
    ]
    return section(
        "training",
        "Training",
        figures(parts),
        table([header for _, header, _ in EPOCH_COLUMNS], rows, ident="epochs-table"),
        note(
            f"best.pt is epoch {training.best_epoch} (green; picked by train.select="
            f"{training.select}): the other sections show its predictions on the validation scans."
        ),
    )


def epoch_cell(value: float | None, digits: int | None) -> Cell:
    """A metrics.csv value: ``digits`` decimals, or scientific notation for None."""
    cell = numeric(value, digits or 0)
    if digits is None and value is not None and math.isfinite(value):
        cell.text = f"{value:.3e}"
    return cell


def per_class_section(metrics: dict) -> str:
    names = metrics["class_names"]
    keys = ("precision", "recall", "f1", "support", "auroc", "pr_auc")
    rows = []
    for name in names:
        values = metrics["per_class"][name]
        cells = [
            numeric(values[k], 0 if k == "support" else 4, key=k, value=json_attribute(values[k]))
            for k in keys
        ]
        rows.append(([name, *cells], ""))
    matrix = metrics["confusion_matrix"]["matrix"]
    counts = [([f"true {name}", *map(str, line)], "") for name, line in zip(names, matrix)]
    return section(
        "per-class",
        "Per class",
        table(
            ["class", "precision", "recall", "F1", "support", "AUROC", "PR-AUC"],
            rows,
            ident="per-class-table",
        ),
        note("Confusion matrix: rows are the true class, columns the predicted class."),
        table(["", *(f"predicted {name}" for name in names)], counts, ident="confusion-table"),
    )


def wrong_scans(evaluation: Evaluation) -> np.ndarray:
    """(N,) bool, in the data set's order: the prediction (by the model's operating point) is
    not the truth."""
    probs, labels = evaluation.in_item_order()
    return evaluation.loaded.decision.predict(probs) != labels


def scans_section(evaluation: Evaluation, anonymize: bool) -> str:
    probs, labels = evaluation.in_item_order()  # (N, C), (N,)
    names = evaluation.loaded.class_names
    predicted = evaluation.loaded.decision.predict(probs)  # (N,)
    number_column = Cell("#", data={"type": "number"})
    header: list[str | Cell] = [
        number_column,
        *([] if anonymize else ["path"]),
        "truth",
        "prediction",
        *(Cell(f"p({name})", data={"type": "number"}) for name in names),
        "error",
    ]
    rows = []
    for i, (source, _) in enumerate(evaluation.items):
        wrong = predicted[i] != labels[i]
        cells = [
            numeric(i + 1, 0),
            *([] if anonymize else [Cell(str(source), "path")]),
            names[labels[i]],
            names[predicted[i]],
            *(numeric(p, 4) for p in probs[i].tolist()),
            "wrong" if wrong else "",
        ]
        rows.append((cells, "wrong" if wrong else ""))
    told = "Click a column header to sort by it, again to reverse. Red rows: wrong predictions."
    numbered = [note(f"Paths {LEFT_OUT}: scans are numbered in the data set's order.")]
    return section(
        "scans",
        f"Every scan ({len(rows)})",
        note(told),
        *(numbered if anonymize else []),
        # a scroll box with a sticky header: a test set of a thousand scans stays one screen high
        f'<div class="scroll">{table(header, rows, sortable=True, ident="scans-table")}</div>',
    )


def cases_section(cases: list[Case], options: ReportOptions, *, mistakes: int) -> str:
    heading = "Most confident mistakes"
    if options.cases == 0:
        return section(
            "cases",
            heading,
            note(
                f"{mistakes} scan(s) wrong; none drawn here: --report-cases K shows the K most "
                "confident mistakes with their relevance maps."
            ),
        )
    if not cases:
        return section("cases", heading, note("No mistakes: every scan is classified right."))
    shown = f"all {mistakes}" if len(cases) == mistakes else f"{len(cases)} of {mistakes}"
    parts = [
        note(f"Wrong scans, {shown}, by the probability given to the wrong class (highest first).")
    ]
    if options.anonymize:
        parts.append(note(f"Images of scans {LEFT_OUT}."))
    parts += [case_html(case, options.anonymize) for case in cases]
    return section("cases", heading, *parts)


def case_html(case: Case, anonymize: bool) -> str:
    title = f"scan {case.number}" if anonymize else f"scan {case.number}: {case.name}"
    said = f"truth {case.truth}, predicted {case.prediction} with probability {case.confidence:.4f}"
    shown = [image(png, caption, "scan", caption) for caption, png in case.images]
    extra = [note(case.note)] if case.note else []
    body = "\n".join([note(said), *extra, *([figures(shown)] if shown else [])])
    return f'<div class="case">\n<h3>{esc(title)}</h3>\n{body}\n</div>'


# -------------------------------------------------------------------------------------- cases


def confident_mistakes(probs: np.ndarray, labels: np.ndarray, k: int) -> list[int]:
    """probs (N, C), labels (N,) → the indices of up to ``k`` wrong scans, the highest probability
    of the (wrong) predicted class first; ties keep the data set's order."""
    predicted = probs.argmax(axis=1)  # (N,)
    wrong = np.flatnonzero(predicted != labels)  # (M,)
    confidence = probs[wrong, predicted[wrong]]  # (M,)
    return wrong[np.argsort(-confidence, kind="stable")][:k].tolist()


def gather_cases(evaluation: Evaluation, options: ReportOptions, *, progress: bool) -> list[Case]:
    """The confident mistakes, with their images unless ``anonymize``."""
    probs, labels = evaluation.in_item_order()  # (N, C), (N,)
    chosen = confident_mistakes(probs, labels, options.cases)
    loaded, names = evaluation.loaded, evaluation.loaded.class_names
    draw = not options.anonymize
    predictor = (
        Predictor(loaded, map_steps=options.map_steps) if draw and has_maps(loaded) else None
    )
    cases = []
    for index in tqdm(chosen, desc="report", disable=not (progress and draw), leave=False):
        source = evaluation.items[index][0]
        images, why = case_images(loaded, predictor, source) if draw else ([], "")
        predicted = int(probs[index].argmax())
        cases.append(
            Case(
                index + 1,
                str(source),
                names[labels[index]],
                names[predicted],
                float(probs[index, predicted]),
                images,
                why,
            )
        )
    return cases


def has_maps(loaded: LoadedModel) -> bool:
    """Relevance maps need the token model (`volumetric.explain`)."""
    return loaded.spec.tokens


def case_images(
    loaded: LoadedModel, predictor: Predictor | None, source: Scan
) -> tuple[list[tuple[str, bytes]], str]:
    """(caption, PNG) pairs of one scan and a note: its relevance montage and the same slices of the
    scan alone; without ``predictor`` (no maps for this model) the slices through the centre."""
    try:
        if predictor is None:
            return slices_alone(loaded, source)
        return map_and_slices(predictor, source)
    except SCAN_FAILURES as error:
        return [], f"no images: {failure_message(str(source), error)}"


def map_and_slices(predictor: Predictor, source: Scan) -> tuple[list[tuple[str, bytes]], str]:
    relevance = predictor(source, explain=True).relevance
    assert relevance is not None  # explain=True gives the prediction its map
    scan, voxels, affine = relevance.scan, relevance.data, relevance.affine  # (W, H, D) ×2, (4, 4)
    name = predictor.class_names[relevance.target]
    steps = predictor.map_steps
    title = f"relevance for {name} (gradient × input, {steps} step{'s' * (steps > 1)})"
    montage = figure_png(montage_figure(scan, voxels, affine, title))
    alone = figure_png(montage_figure(scan, voxels, affine, "the scan alone", overlay=False))
    where = "the map's maximum" if voxels.max() > 0 else "the centre (the map is all zero)"
    return [
        (f"relevance map over the scan: slices through {where}", montage),
        (f"the same slices of the scan alone, through {where}", alone),
    ], ""


def slices_alone(loaded: LoadedModel, source: Scan) -> tuple[list[tuple[str, bytes]], str]:
    original, _ = as_image(source)
    scan = original.data[0].float().numpy()  # (W, H, D): the first channel, as read
    png = figure_png(
        montage_figure(scan, np.zeros_like(scan), original.affine, "the scan", overlay=False)
    )
    why = (
        f"No relevance map: maps need a vit3d model, this checkpoint is {loaded.arch}; "
        "slices through the scan's centre."
    )
    return [("slices through the scan's centre", png)], why


def figure_png(figure: Figure) -> bytes:
    """A matplotlib Figure rendered to PNG bytes (Agg, no display)."""
    FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()
