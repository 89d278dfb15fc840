"""report.html of volumetric-evaluate and volumetric-train, read as HTML (no browser): every scan
once, the metrics of metrics.json, escaped file names, --anonymize, --no-report, the confident
mistakes, a model without relevance maps, and the page of a training run."""

from __future__ import annotations

import html
import json
import re
import shutil
from dataclasses import replace
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_one_line_error, read_csv, train, write_config

from volumetric.checkpoint import load_checkpoint
from volumetric.cli import evaluate_main
from volumetric.data.discovery import class_indices, discover
from volumetric.evaluation.evaluate import Evaluation
from volumetric.evaluation.metrics import evaluation_report
from volumetric.evaluation.predict import Predictions
from volumetric.evaluation.report import (
    ReportOptions,
    confident_mistakes,
    gather_cases,
    render_report,
)
from volumetric.inference import load_model
from volumetric.models.registry import build_model, model_arguments

MALICIOUS = "<img src=x onerror=alert(1)>.nii.gz"
"""A scan file name that is markup: the page must show it as text."""
FAST = ["--report-cases", "2", "--report-map-steps", "1"]  # two cases, one gradient per map


def data_with_markup_name(shared: Path, root: Path) -> Path:
    """A copy of the tiny data set with one more healthy scan, named ``MALICIOUS``."""
    data = root / "data"
    shutil.copytree(shared, data)
    shutil.copy(data / "healthy" / "scan01.nii.gz", data / "healthy" / MALICIOUS)
    return data


def evaluate_with_report(run: Path, data: Path, out: Path, *extra: str) -> Path:
    """volumetric-evaluate best.pt on ``data`` into ``out`` (two cases, one-step maps): out."""
    args = [str(run / "best.pt"), str(data), "--output-dir", str(out), "--no-progress"]
    assert evaluate_main([*args, *FAST, *extra]) == 0
    return out


class Page(HTMLParser):
    """What the tests read from a report: tables (id → rows of cells with their attributes),
    <img> attributes and the visible text."""

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.tables: dict[str, list[list[tuple[str, dict[str, str]]]]] = {}
        self.images: list[dict[str, str]] = []
        self.text: list[str] = []
        self._table = self._cell = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attributes = {k: v or "" for k, v in attrs}
        if tag == "table":
            self._table = self.tables.setdefault(attributes.get("id", ""), [])
        elif tag == "tr" and self._table is not None:
            self._table.append([])
        elif tag in ("td", "th") and self._table is not None:
            self._cell = ["", attributes]
        elif tag == "img":
            self.images.append(attributes)

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self._table[-1].append((self._cell[0], self._cell[1]))
            self._cell = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data):
        self.text.append(data)
        if self._cell is not None:
            self._cell[0] += data

    def column(self, table: str, name: str) -> list[str]:
        """The texts of column ``name`` in the body rows of table ``table``."""
        header, *rows = self.tables[table]
        index = [text for text, _ in header].index(name)
        return [row[index][0] for row in rows]


@pytest.fixture(scope="module")
def evaluated(trained_run, tiny_dataset_shared, tmp_path_factory) -> tuple[Path, Path]:
    """(data with the markup-named scan, the evaluation folder with report.html)."""
    root = tmp_path_factory.mktemp("report")
    data = data_with_markup_name(tiny_dataset_shared, root)
    return data, evaluate_with_report(trained_run, data, root / "eval")


def read_page(out: Path) -> tuple[str, Page]:
    text = (out / "report.html").read_text(encoding="utf-8")
    return text, Page(text)


def test_every_scan_appears_once(evaluated):
    data, out = evaluated
    _, page = read_page(out)
    paths = page.column("scans-table", "path")
    expected = [str(item[0]) for item in discover(data)]
    assert sorted(paths) == sorted(expected) and len(set(paths)) == len(paths) == 21
    assert page.column("scans-table", "#") == [str(i) for i in range(1, 22)]
    metrics = json.loads((out / "metrics.json").read_text())
    wrong = page.column("scans-table", "error").count("wrong")
    assert wrong == metrics["num_scans"] - round(metrics["accuracy"] * metrics["num_scans"])


def test_metrics_shown_equal_metrics_json(evaluated):
    _, out = evaluated
    metrics = json.loads((out / "metrics.json").read_text())
    _, page = read_page(out)
    shown = {a["data-key"]: json.loads(a["data-value"]) for _, a in cells(page, "metrics-table")}
    assert shown == {
        k: metrics[k]
        for k in (
            *("num_scans", "accuracy", "balanced_accuracy", "auroc", "loss", "auroc_ci95"),
            *("pr_auc", "brier", "ece"),
        )
    }
    point = {a["data-key"]: json.loads(a["data-value"]) for _, a in cells(page, "operating-table")}
    assert point == {
        k: metrics["operating_point"][k] for k in ("sensitivity", "specificity", "ppv", "npv")
    }
    low, high = metrics["auroc_ci95"]
    assert f"{low:.4f} – {high:.4f}" in [text for text, _ in cells(page, "metrics-table")]
    per_class = page.tables["per-class-table"][1:]
    for row, name in zip(per_class, metrics["class_names"], strict=True):
        assert row[0][0] == name
        values = {a["data-key"]: json.loads(a["data-value"]) for _, a in row[1:]}
        assert values == metrics["per_class"][name]
    matrix = [[int(text) for text, _ in row[1:]] for row in page.tables["confusion-table"][1:]]
    assert matrix == metrics["confusion_matrix"]["matrix"]


def cells(page: Page, table: str) -> list[tuple[str, dict[str, str]]]:
    """The cells of a table that carry a metrics.json value (data-key and data-value)."""
    return [c for row in page.tables[table] for c in row if "data-value" in c[1]]


def test_file_name_shows_as_text(evaluated):
    _, out = evaluated
    text, page = read_page(out)
    assert "<img src=x" not in text and "onerror=alert" in text  # there, but only escaped
    assert html.escape(MALICIOUS) in text
    assert any(path.endswith(MALICIOUS) for path in page.column("scans-table", "path"))
    # every image is embedded; nothing is fetched: no other src, no link, no external script
    assert page.images and all(i["src"].startswith("data:image/png;base64,") for i in page.images)
    assert "<link" not in text and "<script src" not in text and "http://" not in text
    assert html.escape("default-src 'none'") in text  # the page's Content-Security-Policy


def test_confident_mistakes_have_map_and_slices(evaluated):
    _, out = evaluated
    text, page = read_page(out)
    scans = [i for i in page.images if i.get("class") == "scan"]
    plots = [i for i in page.images if i.get("class") == "plot"]
    assert [i["alt"].split(":")[0] for i in plots] == [
        "confusion matrix",
        "ROC curves",
        "reliability diagram",
    ]
    wrong = page.column("scans-table", "error").count("wrong")
    assert text.count('<div class="case">') == min(2, wrong)
    assert len(scans) == 2 * min(2, wrong)  # relevance montage and the scan alone, each
    assert all(len(i["src"]) > 5_000 for i in scans)


def test_anonymized_page_has_no_path_and_no_scan_image(evaluated, trained_run, tmp_path):
    data, _ = evaluated
    out = evaluate_with_report(trained_run, data, tmp_path / "anon", "--anonymize")
    text, page = read_page(out)
    words = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", text)  # the page less its PNGs
    for word in (str(data), str(trained_run), "scan0", ".nii", "onerror", "healthy/", "best.pt"):
        assert word not in words, word
    assert "path" not in [t for t, _ in page.tables["scans-table"][0]]
    assert page.column("scans-table", "#") == [str(i) for i in range(1, 22)]
    assert [i.get("class") for i in page.images] == ["plot", "plot", "plot"]
    assert "left out (--anonymize)" in text


def test_no_report_writes_no_file(evaluated, trained_run, tmp_path, capsys):
    data, _ = evaluated
    args = [str(trained_run / "best.pt"), str(data), "--output-dir", str(tmp_path / "e")]
    assert evaluate_main([*args, "--no-progress", "--no-report"]) == 0
    assert not (tmp_path / "e" / "report.html").exists()
    assert (tmp_path / "e" / "metrics.json").exists()
    assert "report.html" not in capsys.readouterr().out


def test_bad_report_options_are_one_line_errors(trained_run, tiny_dataset_shared, tmp_path, capsys):
    args = [str(trained_run / "best.pt"), str(tiny_dataset_shared), "--output-dir", str(tmp_path)]
    assert evaluate_main([*args, "--report-cases", "-1"]) == 2
    assert_one_line_error(capsys, "volumetric-evaluate", "--report-cases -1")
    assert evaluate_main([*args, "--report-map-steps", "0"]) == 2
    assert_one_line_error(capsys, "volumetric-evaluate", "--report-map-steps 0")
    assert not list(tmp_path.iterdir())


def test_confident_mistakes_order():
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.4, 0.6], [0.7, 0.3], [0.1, 0.9]])  # (5, 2)
    labels = np.array([0, 0, 0, 1, 1])  # wrong: 1 (0.8), 2 (0.6), 3 (0.7)
    assert confident_mistakes(probs, labels, 8) == [1, 3, 2]
    assert confident_mistakes(probs, labels, 2) == [1, 3]
    assert confident_mistakes(probs, labels, 0) == []


def test_model_without_maps_shows_slices_and_says_why(trained_run, tiny_dataset_shared):
    loaded = load_model(trained_run / "best.pt", device="cpu")
    args = model_arguments("densenet121", {"in_channels": 1, "patch_size": 4}, num_classes=2)
    dense = replace(loaded, model=build_model("densenet121", args).eval(), arch="densenet121")
    pairs = class_indices(discover(tiny_dataset_shared), dense.class_names, "data")[:4]
    probs = torch.tensor([[0.2, 0.8], [0.6, 0.4], [0.3, 0.7], [0.9, 0.1]])  # (4, 2): 2 wrong
    labels = torch.tensor([label for _, label in pairs])  # healthy ×4
    metrics = evaluation_report(probs, labels, dense.class_names)
    evaluation = Evaluation(dense, pairs, Predictions(probs, labels, torch.arange(4), 0.5), metrics)
    options = ReportOptions(cases=8)
    cases = gather_cases(evaluation, options, progress=False)
    assert [c.number for c in cases] == [1, 3]
    assert all(len(c.images) == 1 and "vit3d" in c.note for c in cases)
    page = Page(render_report(evaluation, {}, options, cases, source="data"))
    assert len([i for i in page.images if i.get("class") == "scan"]) == 2
    assert "No relevance map: maps need a vit3d model, this checkpoint is densenet121" in "".join(
        page.text
    )


def test_training_run_writes_its_report(trained_run):
    text, page = read_page(trained_run)
    assert "volumetric training report" in text
    assert page.column("epochs-table", "epoch") == ["1", "2"]
    # best.pt on the validation scans: the numbers its epoch logged in metrics.csv
    _, rows = read_csv(trained_run / "metrics.csv")
    best = rows[load_checkpoint(trained_run / "best.pt").epoch - 1]
    shown = {a["data-key"]: json.loads(a["data-value"]) for _, a in cells(page, "metrics-table")}
    for key in ("accuracy", "balanced_accuracy", "auroc", "loss"):
        assert shown[key] == pytest.approx(float(best[f"val_{key}"]), abs=1e-5), key
    alts = [i["alt"] for i in page.images]
    assert alts == [
        "confusion matrix",
        "ROC curves",
        "reliability diagram",
        "learning curves",
    ]  # no maps by default
    assert len(page.tables["scans-table"]) - 1 == 4  # the 20% validation split of 20 scans
    assert "--report-cases K" in text


@pytest.mark.slow  # trains
def test_training_report_draws_cases_when_asked(tiny_dataset_shared, tmp_path):
    config = write_config(tmp_path / "tiny.yaml")
    run = tmp_path / "run"
    assert train(tiny_dataset_shared, run, config, "--train.epochs=1", "--report", *FAST) == 0
    text, page = read_page(run)
    wrong = page.column("scans-table", "error").count("wrong")
    assert text.count('<div class="case">') == min(2, wrong)
    assert len([i for i in page.images if i.get("class") == "scan"]) == 2 * min(2, wrong)
    assert page.column("epochs-table", "epoch") == ["1"]
