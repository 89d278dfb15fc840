"""Console entry points: parse, call the library, report.

Exit status: 0 success; 1 ``volumetric-infer`` classified some scans but not all; 2 a user error
(`VolumetricError`: one line); 70 a bug (any other exception: one line that says so; ``--debug``
shows the traceback); 128 + N stopped by signal N (a resumable last.pt is saved).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from volumetric.config import (
    Config,
    apply_overrides,
    config_from_dict,
    config_to_yaml,
    load_config,
    load_raw_config,
)
from volumetric.engine.distributed import is_main
from volumetric.engine.interrupt import TrainingInterrupted
from volumetric.errors import VolumetricError, first_line
from volumetric.explain.relevance import STEPS
from volumetric.version import __version__

log = logging.getLogger("volumetric")

EXIT_USAGE = 2  # the user's input: a bad path, scan, config or checkpoint
EXIT_BUG = 70  # EX_SOFTWARE: an exception that is not a VolumetricError


def _parser(prog: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument(
        "--device", default=None, help="auto (default: CUDA when present), cpu, cuda, cuda:1, ..."
    )
    parser.add_argument(
        "--no-progress", action="store_true", help="no progress bars (for logs and CI)"
    )
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser


def _data_options(parser: argparse.ArgumentParser, *, cache: bool) -> None:
    """--num-workers (and --cache-dir where preprocessed volumes are cached)."""
    parser.add_argument(
        "--num-workers",
        default=None,
        metavar="N",
        help="processes reading and preprocessing scans: auto (one per CPU beyond the first, none "
        "on 2 CPUs: the default) or a number, 0 for none",
    )
    if cache:
        parser.add_argument(
            "--cache-dir",
            help="disk cache of preprocessed volumes (default: $VOLUMETRIC_CACHE, else "
            "~/.cache/volumetric; see volumetric-cache)",
        )


def _report_options(parser: argparse.ArgumentParser, *, cases: int, what: str) -> None:
    """--report/--no-report, --report-cases, --report-map-steps (evaluation/report.py)."""
    from volumetric.evaluation.report import REPORT_MAP_STEPS

    parser.add_argument(
        "--report",
        action=argparse.BooleanOptionalAction,
        default=True,
        help=f"write report.html, one self-contained page: {what} (default: on)",
    )
    parser.add_argument(
        "--report-cases",
        type=int,
        default=cases,
        metavar="K",
        help="the K most confident mistakes on the report page, with relevance maps and slices "
        f"of the scan (default {cases})",
    )
    parser.add_argument(
        "--report-map-steps",
        type=int,
        default=REPORT_MAP_STEPS,
        metavar="M",
        help="gradient evaluations per relevance map of the report (default "
        f"{REPORT_MAP_STEPS}; volumetric-infer --maps uses {STEPS})",
    )


def _report(args: argparse.Namespace):
    """The ReportOptions of --report..., or None with --no-report."""
    from volumetric.evaluation.report import ReportOptions

    if not args.report:
        return None
    anonymize = getattr(args, "anonymize", False)
    return ReportOptions(args.report_cases, args.report_map_steps, anonymize)


def _workers(value: str | None) -> int | str:
    if value is None or value == "auto":
        return "auto"
    if value.isdigit():
        return int(value)
    raise VolumetricError(f"--num-workers {value}: give auto or a number, 0 or more")


def _run(
    argv: Sequence[str] | None,
    parser: argparse.ArgumentParser,
    body: Callable,
    allow_overrides: bool = False,
) -> int:
    """Parse, set up logging, call ``body(args, overrides)``. A VolumetricError (the user's input:
    the library turns every check of a user's value into one, a ConfigError for config values)
    becomes one line and status 2; any other exception, a ValueError included, is a bug: one line
    that says so and status 70. `--debug` shows the traceback of either."""
    if allow_overrides:
        args, rest = parser.parse_known_args(argv)
        overrides = [
            a for a in rest if a.startswith("--") and "=" in a and "." in a.split("=", 1)[0]
        ]
        unknown = [a for a in rest if a not in overrides]
        if unknown:
            parser.error(
                f"unrecognized arguments: {' '.join(unknown)} (config overrides look like --train.epochs=5)"
            )
    else:
        args, overrides = parser.parse_args(argv), []
    # under torchrun only rank 0 reports progress; the other processes log warnings and errors only
    level = logging.INFO if is_main() else logging.WARNING
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S"
    )
    try:
        return body(args, overrides) or 0
    except VolumetricError as error:
        if args.debug:
            raise
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except TrainingInterrupted as stopped:
        if is_main():  # every process stops at the same step; one says so
            print(f"{parser.prog}: {stopped}", file=sys.stderr)
        return 128 + stopped.signum
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # not the user's doing: a bug here or in a library
        if args.debug:
            raise
        print(
            f"{parser.prog}: internal error (a bug, please report it): {type(error).__name__}: "
            f"{first_line(error, 'no message')} (run again with --debug for the traceback)",
            file=sys.stderr,
        )
        return EXIT_BUG


# ------------------------------------------------------------------------------------------------ train


def train_parser() -> argparse.ArgumentParser:
    parser = _parser(
        "volumetric-train",
        "Train a whole-volume classifier on a folder of class sub-folders or a CSV.",
    )
    parser.add_argument(
        "data",
        nargs="?",
        help="training data: root/<class>/*.nii.gz, or a CSV manifest with path,label",
    )
    parser.add_argument(
        "--val", help="validation data in the same form (default: a stratified split of DATA)"
    )
    parser.add_argument(
        "--config",
        action="append",
        metavar="YAML",
        help="config file; repeat to merge several in order, e.g. base, then data set, then "
        "experiment (default: built-in defaults; with --resume, the run's own)",
    )
    parser.add_argument(
        "--output-dir",
        help="run folder: checkpoints, metrics.csv, config.yaml, learning_curves.png, tensorboard/",
    )
    parser.add_argument(
        "--resume", action="store_true", help="continue the run in --output-dir from its last.pt"
    )
    parser.add_argument(
        "--folds",
        type=int,
        metavar="K",
        help="K-fold cross-validation: one run per fold in OUTPUT_DIR/fold-k (grouped and "
        "stratified), then the out-of-fold predictions and a summary; run again to finish an "
        "interrupted one; OUTPUT_DIR is then an ensemble for volumetric-infer and -evaluate",
    )
    parser.add_argument(
        "--init",
        metavar="CHECKPOINT",
        help="fine-tune: start from this checkpoint's weights (a new head when the classes "
        "differ; sets train.init; see also train.freeze_blocks)",
    )
    parser.add_argument(
        "--print-config",
        action="store_true",
        help="print the resolved config (defaults, --config files, overrides) as YAML and exit",
    )
    parser.add_argument(
        "--cache-dir",
        help="disk cache of preprocessed volumes, for train.cache: disk (default: "
        "$VOLUMETRIC_CACHE, else ~/.cache/volumetric; see volumetric-cache)",
    )
    _report_options(
        parser, cases=0, what="best.pt on the validation scans, with the training curves"
    )
    parser.epilog = "Any config value can be overridden: --train.epochs=5 --model.attention=softmax"
    return parser


def _config_of_the_run(args: argparse.Namespace, overrides: list[str]) -> Config:
    """The config a run being resumed was started with (its last.pt), with today's overrides."""
    from volumetric.checkpoint import load_checkpoint

    if args.output_dir is None:
        raise VolumetricError("--resume needs the --output-dir of the run to continue")
    raw = load_checkpoint(Path(args.output_dir) / "last.pt").config
    return config_from_dict(apply_overrides(raw, overrides))


def _configure_cpu(config: Config) -> None:
    """The CPU allocator for a training run: a process-wide choice, so the command's to make,
    not the library's (see device.py)."""
    from volumetric.device import configure_cpu_allocator, resolve_device

    if resolve_device(config.train.device).type == "cpu":
        model = config.model
        configure_cpu_allocator(memory_saving=model.grad_checkpointing or model.memory_lean)


def train_main(argv: Sequence[str] | None = None) -> int:
    return _run(argv, train_parser(), _train, allow_overrides=True)


def _train(args: argparse.Namespace, overrides: list[str]) -> int:
    from volumetric.checkpoint import load_checkpoint
    from volumetric.data.discovery import discover
    from volumetric.engine.finetune import model_section_from_init
    from volumetric.engine.train import train

    raw: dict[str, Any] = {}  # what the user set
    if args.resume and args.config is None:
        config = _config_of_the_run(args, overrides)
    else:
        raw = load_raw_config(args.config, overrides)
        if args.init:
            raw.setdefault("train", {})["init"] = args.init
        init = (raw.get("train") or {}).get("init")
        if init and not args.resume:  # the architecture of the checkpoint the run starts from
            raw["model"] = model_section_from_init(raw.get("model") or {}, load_checkpoint(init))
        config = config_from_dict(raw)
    if args.device:
        config.train.device = args.device
    if args.init:
        config.train.init = args.init
    training = validation = None  # discovered once here when the defaults are fitted to them
    if args.config is None and not args.resume and args.data is not None:
        training = discover(args.data, channels=config.data.channels)
        validation = discover(args.val, channels=config.data.channels) if args.val else None
        sources = [e.source for e in training]
        _batch_scans_of_one_size(sources + [e.source for e in validation or []], config, raw)
        _warn_of_defaults(sources, config)
    if args.print_config:
        print(config_to_yaml(config), end="")
        return 0
    if args.data is None or args.output_dir is None:
        raise VolumetricError("training needs DATA and --output-dir (see volumetric-train --help)")
    report = _report(args)  # checked before hours of training, not after
    _configure_cpu(config)
    if args.folds is not None:
        return _train_folds(args, config, report)
    if training is None:
        training = discover(args.data, channels=config.data.channels)
        validation = discover(args.val, channels=config.data.channels) if args.val else None
    result = train(
        config,
        training,
        validation,
        args.output_dir,
        resume=args.resume,
        progress=not args.no_progress,
        cache_dir=args.cache_dir,
        report=report,
    )
    if not is_main():  # under torchrun: rank 0 reports
        return 0
    best = result.best_metrics
    summary = ", ".join(
        f"{k}={best[k]:.4f}"
        for k in ("val_accuracy", "val_balanced_accuracy", "val_auroc")
        if k in best
    )
    print(f"best epoch {result.best_epoch}: {summary or 'no validation set'}")
    print(f"checkpoints: {result.output_dir / 'best.pt'}, {result.output_dir / 'last.pt'}")
    if (result.output_dir / "report.html").exists() and report is not None:
        print(f"report: {result.output_dir / 'report.html'}")
    return 0


def _batch_scans_of_one_size(sources: list[Any], config: Any, raw: dict[str, Any]) -> None:
    """Training or pretraining on the built-in defaults: when the headers of all the scans say
    they are of one size, one target shape and batches of several, as volumetric-plan proposes
    (volumetric/data/plan.py); what the command line sets stays."""
    from volumetric.data.plan import SHARED_SHAPE_BATCH, header_shape

    if "target_shape" in (raw.get("data") or {}) or "batch_size" in (raw.get("train") or {}):
        return
    shape = header_shape(sources, config)
    if shape is None:
        return
    config.data.target_shape, config.train.batch_size = shape, SHARED_SHAPE_BATCH
    log.info(
        "the %d scans are of one size: data.target_shape %s (the largest, padded to a patch "
        "multiple) and train.batch_size %d, as volumetric-plan proposes; "
        "--data.target_shape=null --train.batch_size=1 keeps each scan's own grid",
        len(sources),
        shape,
        SHARED_SHAPE_BATCH,
    )


def _warn_of_defaults(sources: list[Any], config: Any) -> None:
    """Training on the built-in defaults: one warning per default that a few of the training
    scans (``sources``) contradict (volumetric/data/plan.py)."""
    from volumetric.data.plan import contradictions, fingerprint

    try:
        fp = fingerprint(sources, sample=5, seed=config.train.seed)
    except VolumetricError:
        return  # an unreadable scan: the pre-flight names it
    for line in contradictions(fp, config):
        log.warning("%s", line)


def _train_folds(args: argparse.Namespace, config: Any, report: Any) -> int:
    from volumetric.data.discovery import discover
    from volumetric.engine.folds import train_folds

    if args.val:
        raise VolumetricError("--folds makes its own validation parts: leave out --val")
    result = train_folds(
        config,
        discover(args.data, channels=config.data.channels),
        args.folds,
        args.output_dir,
        progress=not args.no_progress,
        cache_dir=args.cache_dir,
        report=report,
    )
    if result is None:  # under torchrun: rank 0 reports
        return 0
    summary = result.summary
    for key in ("accuracy", "balanced_accuracy", "auroc"):
        mean, sd = summary["mean_sd"][key]
        shown = "undefined" if mean is None else f"{mean:.4f} ± {sd if sd is not None else 0:.4f}"
        print(f"{key} over {summary['folds']} folds: {shown}")
    print(f"out-of-fold predictions: {result.output_dir / 'oof_predictions.csv'}")
    print(
        f"summary: {result.output_dir / 'summary.md'}; the folds as one model: {result.output_dir}"
    )
    return 0


# --------------------------------------------------------------------------------------------- pretrain


def pretrain_parser() -> argparse.ArgumentParser:
    parser = _parser(
        "volumetric-pretrain",
        "Pretrain a VolumeTransformer on unlabeled scans by masked-volume modeling (MAE); "
        "fine-tune it with volumetric-train --init RUN/pretrained.pt.",
    )
    parser.add_argument(
        "data",
        nargs="*",
        help="scans: folders (searched at any depth), scan files, DICOM series folders, or CSV "
        "manifests with a path column; labels are not read",
    )
    parser.add_argument(
        "--config",
        action="append",
        metavar="YAML",
        help="config file; repeat to merge several in order (the model, data, augment, train "
        "and pretrain sections; default: built-in defaults; with --resume, the run's own)",
    )
    parser.add_argument(
        "--output-dir",
        help="run folder: pretrained.pt, last.pt, metrics.csv, reconstructions.png, report.html",
    )
    parser.add_argument(
        "--resume", action="store_true", help="continue the run in --output-dir from its last.pt"
    )
    parser.add_argument(
        "--print-config",
        action="store_true",
        help="print the resolved config (defaults, --config files, overrides) as YAML and exit",
    )
    parser.add_argument(
        "--cache-dir",
        help="disk cache of preprocessed volumes, for train.cache: disk (default: "
        "$VOLUMETRIC_CACHE, else ~/.cache/volumetric; see volumetric-cache)",
    )
    parser.add_argument(
        "--report",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="write reconstructions.png and report.html at the end (default: on)",
    )
    parser.epilog = (
        "Any config value can be overridden: --pretrain.epochs=50 --pretrain.mask_ratio=0.6"
    )
    return parser


def pretrain_main(argv: Sequence[str] | None = None) -> int:
    return _run(argv, pretrain_parser(), _pretrain, allow_overrides=True)


def _pretrain(args: argparse.Namespace, overrides: list[str]) -> int:
    from volumetric.engine.pretrain import pretrain, pretraining_entries

    raw: dict[str, Any] = {}  # what the user set
    if args.resume and args.config is None:
        config = _config_of_the_run(args, overrides)
    else:
        raw = load_raw_config(args.config, overrides)
        config = config_from_dict(raw)
    if args.device:
        config.train.device = args.device
    entries = None  # the scans, found once: for the shared shape and for the pretraining
    if args.config is None and not args.resume and args.data:
        entries, _ = pretraining_entries(args.data, config)
        _batch_scans_of_one_size([e.source for e in entries], config, raw)
    if args.print_config:
        print(config_to_yaml(config), end="")
        return 0
    if not args.data or args.output_dir is None:
        raise VolumetricError(
            "pretraining needs DATA and --output-dir (see volumetric-pretrain --help)"
        )
    _configure_cpu(config)
    result = pretrain(
        config,
        args.data,
        args.output_dir,
        entries=entries,
        resume=args.resume,
        progress=not args.no_progress,
        cache_dir=args.cache_dir,
        report=args.report,
    )
    if not is_main():
        return 0
    best = result.history[result.best_epoch - 1] if result.best_epoch else {}
    loss = best.get("val_loss")
    shown = f"validation loss {loss:.4f}" if loss is not None else "no held-out scans"
    print(f"pretrained.pt: epoch {result.best_epoch}, {shown}")
    print(f"fine-tune with: volumetric-train DATA --init {result.output_dir / 'pretrained.pt'}")
    return 0


# ------------------------------------------------------------------------------------------------- plan


def plan_parser() -> argparse.ArgumentParser:
    parser = _parser(
        "volumetric-plan",
        "Propose preprocessing from the data itself (modality, intensities, spacings, sizes): "
        "write a complete config with a comment on every planned choice.",
    )
    parser.add_argument(
        "data",
        nargs="+",
        help="scans: folders (searched recursively; class sub-folders are fine), files, DICOM "
        "series, or CSV manifests",
    )
    parser.add_argument("--output", required=True, help="the config to write, e.g. plan.yaml")
    parser.add_argument(
        "--config",
        action="append",
        metavar="YAML",
        help="start from these config files instead of the built-in defaults (repeatable)",
    )
    parser.add_argument(
        "--sample",
        type=int,
        metavar="N",
        help="read N scans drawn at random (seeded) instead of all of them",
    )
    return parser


def plan_main(argv: Sequence[str] | None = None) -> int:
    return _run(argv, plan_parser(), _plan, allow_overrides=True)


def _plan(args: argparse.Namespace, overrides: list[str]) -> int:
    from volumetric.atomic_files import atomic_write_text
    from volumetric.data.discovery import Unusable, inference_inputs
    from volumetric.data.plan import fingerprint, plan, plan_config, plan_yaml

    if args.sample is not None and args.sample < 1:
        raise VolumetricError(f"--sample {args.sample}: give a number of scans, 1 or more")
    base = load_config(args.config, overrides)
    found = inference_inputs(args.data, channels=base.data.channels)
    for item in found:
        if isinstance(item, Unusable):
            raise VolumetricError(item.error)
    sources = [s for s in found if not isinstance(s, Unusable)]
    fp = fingerprint(sources, sample=args.sample, seed=base.train.seed)
    raw, reasons = plan_config(base, plan(fp, base.model.patch_size))
    config_from_dict(raw)  # what is written must load
    atomic_write_text(Path(args.output), plan_yaml(raw, reasons, fp))
    data = raw["data"]
    print(
        f"{fp.scans} scans: {fp.modality} ({fp.modality_source}); intensity {data['intensity']}, "
        f"spacing {data['spacing']}, target_shape {data['target_shape']}"
    )
    print(f"wrote {args.output}: volumetric-train DATA --config {args.output} --output-dir RUN")
    return 0


# --------------------------------------------------------------------------------------------- evaluate


def evaluate_parser() -> argparse.ArgumentParser:
    parser = _parser("volumetric-evaluate", "Metrics of a checkpoint on a labelled data set.")
    parser.add_argument(
        "checkpoint",
        nargs="+",
        help="a .pt file written by volumetric-train; several, or the folder of a --folds run, "
        "evaluate their ensemble (the mean of their probabilities)",
    )
    parser.add_argument(
        "data", help="labelled data: root/<class>/*.nii.gz, or a CSV manifest with path,label"
    )
    parser.add_argument(
        "--output-dir",
        required=True,
        help="where metrics.json, predictions.csv, confusion_matrix.png, roc.png, reliability.png "
        "and report.html go",
    )
    _data_options(parser, cache=True)
    from volumetric.evaluation.report import REPORT_CASES

    _report_options(
        parser, cases=REPORT_CASES, what="metrics, plots, every scan, the confident mistakes"
    )
    parser.add_argument(
        "--anonymize",
        action="store_true",
        help="report.html without paths (scans are numbered) and without images of scans",
    )
    parser.add_argument(
        "--allow-modality-mismatch",
        action="store_true",
        help="evaluate scans of another modality than the training scans' (DICOM Modality, a "
        "manifest's modality column or a JSON sidecar); by default they stop it with an error",
    )
    return parser


def evaluate_main(argv: Sequence[str] | None = None) -> int:
    return _run(argv, evaluate_parser(), _evaluate)


def _evaluate(args: argparse.Namespace, overrides: list[str]) -> int:
    from volumetric.data.loading import LoadingOptions
    from volumetric.evaluation.evaluate import evaluate_checkpoint

    loading = LoadingOptions(
        cache_dir=args.cache_dir,
        num_workers=_workers(args.num_workers),
        progress=not args.no_progress,
    )
    metrics = evaluate_checkpoint(
        args.checkpoint,
        args.data,
        args.output_dir,
        device=args.device or "auto",
        loading=loading,
        report=_report(args),
        allow_modality_mismatch=args.allow_modality_mismatch,
    )

    def number(key: str) -> str:
        return "undefined" if metrics[key] is None else f"{metrics[key]:.4f}"

    ci = metrics["auroc_ci95"]
    interval = (
        f" (95% CI {ci[0]:.4f}-{ci[1]:.4f}, {metrics['auroc_bootstrap']['used']} resamples)"
        if ci
        else ""
    )
    print(
        f"{metrics['num_scans']} scans: accuracy {number('accuracy')}, balanced accuracy "
        f"{number('balanced_accuracy')}, AUROC {number('auroc')}{interval}, loss {number('loss')}"
    )
    if metrics["auroc_note"]:
        print(metrics["auroc_note"])
    names: tuple[str, ...] = ("metrics.json", "predictions.csv", "confusion_matrix.png", "roc.png")
    names += ("reliability.png",)
    names += ("report.html",) if args.report else ()
    written = [Path(args.output_dir) / name for name in names]
    print(f"wrote {', '.join(map(str, written))}")
    return 0


# ------------------------------------------------------------------------------------------------ infer


def infer_parser() -> argparse.ArgumentParser:
    parser = _parser(
        "volumetric-infer", "Classify scans with a trained checkpoint and write a CSV."
    )
    parser.add_argument(
        "inputs",
        nargs="+",
        metavar="CHECKPOINT... INPUT",
        help="first the model: a .pt file written by volumetric-train, or several, or the folder "
        "of a --folds run (an ensemble: the mean of their probabilities); then the scans: scan "
        "files, folders searched recursively for scans (scan files, and DICOM series: one scan "
        "per series), or CSV manifests; each input gets at least one row",
    )
    parser.add_argument(
        "--output", default="predictions.csv", help="CSV to write (default: predictions.csv)"
    )
    parser.add_argument(
        "--maps",
        metavar="DIR",
        help="write DIR/<scan>_relevance.nii.gz (on the scan's own grid) "
        "and DIR/<scan>_relevance.png: gradient × input on the patch tokens, predicted class",
    )
    parser.add_argument(
        "--tta",
        type=int,
        default=0,
        metavar="N",
        help="test-time augmentation: N random "
        "flips (and the training's affine) besides the scan; adds prob_std_<class> (default 0: off)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the --tta views (default 0)")
    parser.add_argument(
        "--allow-modality-mismatch",
        action="store_true",
        help="score scans of another modality than the training scans' (DICOM Modality, a "
        "manifest's modality column or a JSON sidecar); by default they get an error row",
    )
    parser.add_argument(
        "--map-steps",
        type=int,
        default=STEPS,
        metavar="M",
        help="gradient evaluations per --maps "
        f"map, along a path from an empty scan (default {STEPS}; 1: plain gradient × input, fastest)",
    )
    _data_options(parser, cache=False)
    parser.epilog = "Exit status: 0 all scans classified, 1 some scans failed (see the error column), 2 user error."
    return parser


def infer_main(argv: Sequence[str] | None = None) -> int:
    return _run(argv, infer_parser(), _infer)


def _infer(args: argparse.Namespace, overrides: list[str]) -> int:
    from volumetric.data.discovery import inference_inputs
    from volumetric.inference import PredictionError, Predictor, predict_to_csv

    if args.tta < 0:
        raise VolumetricError(
            f"--tta {args.tta}: the number of augmented passes must be 0 (off) or more"
        )
    if args.map_steps < 1:
        raise VolumetricError(
            f"--map-steps {args.map_steps}: at least 1 gradient evaluation is needed"
        )
    models, inputs = split_models(args.inputs)
    predictor = Predictor(
        models,
        device=args.device or "auto",
        tta=args.tta,
        seed=args.seed,
        map_steps=args.map_steps,
        allow_modality_mismatch=args.allow_modality_mismatch,
    )
    # every input gets a row: its scans', or one with the error of an input that gave none
    scans = inference_inputs(inputs, channels=predictor.loaded.channels)
    maps = Path(args.maps) if args.maps else None
    predictions = predict_to_csv(
        predictor,
        scans,
        Path(args.output),
        progress=not args.no_progress,
        maps=maps,
        num_workers=_workers(args.num_workers),
    )
    failed = sum(1 for p in predictions if isinstance(p, PredictionError))
    print(
        f"wrote {len(predictions)} rows to {args.output} ({failed} failed)"
        + (f"; relevance maps in {maps}" if maps else "")
    )
    return 1 if failed else 0


def split_models(arguments: list[str]) -> tuple[list[str], list[str]]:
    """volumetric-infer's positionals: the leading .pt files and --folds run folders are the
    model, the rest the inputs; a VolumetricError when either is missing."""
    from volumetric.ensemble import is_folds_folder

    count = 0
    while count < len(arguments) and (
        arguments[count].lower().endswith(".pt") or is_folds_folder(arguments[count])
    ):
        count += 1
    if count == 0:
        raise VolumetricError(
            f"{arguments[0]}: give the model first: a .pt checkpoint (or several, or the folder "
            "of a --folds run), then the scans"
        )
    if count == len(arguments):
        raise VolumetricError("no scans to classify: give scan files or folders after the model")
    return arguments[:count], arguments[count:]


# ------------------------------------------------------------------------------------------------ cache


def cache_parser() -> argparse.ArgumentParser:
    parser = _parser("volumetric-cache", "List or free the disk cache of preprocessed volumes.")
    parser.add_argument("action", choices=("info", "clear"))
    parser.add_argument(
        "--cache-dir", help="the cache (default: $VOLUMETRIC_CACHE, else ~/.cache/volumetric)"
    )
    parser.add_argument(
        "--older-than",
        type=float,
        metavar="DAYS",
        help="clear: only entries not used for DAYS days (default: all)",
    )
    return parser


def cache_main(argv: Sequence[str] | None = None) -> int:
    return _run(argv, cache_parser(), _cache)


def _cache(args: argparse.Namespace, overrides: list[str]) -> int:
    import time

    from volumetric.data.cache import clear, default_cache_dir, summarize

    root = Path(args.cache_dir) if args.cache_dir else default_cache_dir()
    if args.older_than is not None and args.older_than < 0:
        raise VolumetricError(f"--older-than {args.older_than}: give a number of days, 0 or more")
    if args.action == "clear":
        removed, freed = clear(root, args.older_than)
        print(f"{root}: deleted {removed} entries, freed {freed / 2**20:.1f} MiB")
        return 0
    summary = summarize(root)
    print(f"{root}: {summary.entries} entries, {summary.bytes / 2**20:.1f} MiB")
    if summary.entries:
        assert summary.newest_use is not None and summary.oldest_use is not None  # with entries
        days = [(time.time() - t) / 86400 for t in (summary.newest_use, summary.oldest_use)]
        print(f"last used {days[0]:.1f} to {days[1]:.1f} days ago")
    return 0


# ----------------------------------------------------------------------------------------------- export


def export_parser() -> argparse.ArgumentParser:
    parser = _parser(
        "volumetric-export",
        "Export a checkpoint's model to run outside this package (ONNX, or torch.export .pt2), "
        "with its preprocessing as JSON and a reference input/tensor pair beside it.",
    )
    parser.add_argument("checkpoint", help="a .pt file written by volumetric-train")
    parser.add_argument("--format", choices=("onnx", "pt2"), required=True, dest="fmt")
    parser.add_argument("--output", required=True, help="the model file: NAME.onnx or NAME.pt2")
    parser.add_argument("--opset", type=int, help="ONNX opset, 18 to 23 (default 20)")
    return parser


def export_main(argv: Sequence[str] | None = None) -> int:
    return _run(argv, export_parser(), _export)


def _export(args: argparse.Namespace, overrides: list[str]) -> int:
    from volumetric.export import export_model

    written = export_model(args.checkpoint, args.output, fmt=args.fmt, opset=args.opset)
    print(f"wrote {written[0]}")
    for path in written[1:]:
        print(f"  and {path}")
    return 0


# ------------------------------------------------------------------------------------------------ bench


def bench_parser() -> argparse.ArgumentParser:
    parser = _parser(
        "volumetric-bench",
        "Seq-norm vs softmax attention and volumetric vs MONAI ViT, side by side.",
    )
    parser.add_argument(
        "--quick", action="store_true", help="small sizes and short caps (about 2 minutes on a CPU)"
    )
    parser.add_argument(
        "--output",
        default="benchmarks.md",
        help="Markdown report to update (default: benchmarks.md here; the repository's own "
        "record is docs/benchmarks.md)",
    )
    parser.add_argument(
        "--plot",
        default="benchmarks.png",
        help="log-log plot of attention time and memory (default: benchmarks.png here)",
    )
    parser.add_argument(
        "--threads", type=int, help="torch threads per case (default: torch's choice)"
    )
    parser.add_argument(
        "--memory-cap-gib", type=float, default=20.0, help="skip cases predicted to need more"
    )
    parser.add_argument(
        "--gpu",
        action="store_true",
        help="the GPU plan: the seq-norm kernel against the bare product and SDPA from 16k to 1M "
        "tokens, and training and inference on whole 256³ volumes against DenseNet121 and "
        "MONAI's ViT; each result lands in the report and OUTPUT-gpu.jsonl as it is measured "
        "(about 8 minutes on one H100; needs CUDA)",
    )
    parser.add_argument(
        "--data",
        action="store_true",
        help="only the data pipeline: generated CT scans through pre-flight, cache, loaders, "
        "training, MONAI's PersistentDataset and inference (about 25 minutes on 2 CPU cores)",
    )
    parser.add_argument(
        "--data-scans", type=int, default=24, metavar="N", help="--data: scans (default 24)"
    )
    parser.add_argument(
        "--data-dir",
        metavar="DIR",
        help="--data: keep the generated scans here and reuse them (default: a temporary folder)",
    )
    return parser


def bench_main(argv: Sequence[str] | None = None) -> int:
    parser = bench_parser()
    parser.set_defaults(argv=list(sys.argv[1:] if argv is None else argv))
    return _run(argv, parser, _bench)


def _bench(args: argparse.Namespace, overrides: list[str]) -> int:
    from volumetric.bench.report import format_ratio, markdown, plot, write_markdown
    from volumetric.bench.suite import SuiteSettings, ratios, run_suite
    from volumetric.device import resolve_device

    device = resolve_device(args.device or "auto")
    command = "volumetric-bench " + " ".join(args.argv)
    if args.gpu:
        from volumetric.bench.gpu import run_and_report as run_gpu

        if device.type != "cuda":
            raise VolumetricError(
                f"--gpu measures a CUDA device; this run's device is {device} "
                "(no CUDA device is visible to torch)"
            )
        run_gpu(Path(args.output), command.strip())
        print(f"wrote {args.output}")
        return 0
    if args.data:
        from volumetric.bench.data import DataBenchSettings, run_and_report

        data_dir = Path(args.data_dir) if args.data_dir else None
        data = DataBenchSettings(
            scans=args.data_scans, data_dir=data_dir, device=str(device), threads=args.threads
        )
        run_and_report(data, Path(args.output), command.strip(), f"data-{device.type}")
        return 0
    settings = SuiteSettings(
        quick=args.quick,
        device=str(device),
        threads=args.threads,
        memory_cap_gib=args.memory_cap_gib,
    )
    results = run_suite(settings)
    measured = ratios(results, settings)
    for name, value, target in measured:
        print(f"{name}: {format_ratio(value)} (target {target})")
    marker = f"{'quick' if args.quick else 'full'}-{device.type}"
    write_markdown(
        Path(args.output), markdown(results, measured, settings, command.strip()), marker
    )
    if not args.quick:
        plot(results, Path(args.plot))
    print(f"wrote {args.output}" + ("" if args.quick else f" and {args.plot}"))
    return 0


# ------------------------------------------------------------------------------------------ parsers

PARSERS: dict[str, Callable[[], argparse.ArgumentParser]] = {
    "volumetric-train": train_parser,
    "volumetric-pretrain": pretrain_parser,
    "volumetric-plan": plan_parser,
    "volumetric-evaluate": evaluate_parser,
    "volumetric-infer": infer_parser,
    "volumetric-bench": bench_parser,
    "volumetric-export": export_parser,
    "volumetric-cache": cache_parser,
}


def parser_for(name: str) -> argparse.ArgumentParser:
    """The argument parser of console script ``name`` (e.g. volumetric-train), built without
    running the command (for --help text and the documentation's tests)."""
    return PARSERS[name]()
