"""The data benchmark (`volumetric-bench --data`): the whole data path of a training run, timed.

On a generated set of CT-like scans it runs, in one go:

1. training through the real `volumetric.engine.train.train` (pre-flight, disk cache, DataLoader),
   first on an empty cache with loading workers (`parallel_workers`), then again with none;
2. the same with half the scans on another empty cache, for peak memory against data set size;
3. the same data through MONAI's PersistentDataset and a plain loop, as the anchor to beat;
4. inference: `predict_to_csv` (what ``volumetric-infer`` runs) on the scans against a
   one-scan-at-a-time `Predictor` loop.

What the engine does not report is measured from outside: the training DataLoader is wrapped,
through `train`'s ``loader_hook``, in `TimedLoader`, which times every ``next()``; a
`MemorySampler` thread adds up the private memory (USS) of this process and its DataLoader
workers. USS rather than RSS: pages of a memory-mapped cache file,
shared by the workers and the page cache, would otherwise be counted once per process.
"""

from __future__ import annotations

import csv
import gc
import gzip
import json
import math
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from volumetric.atomic_files import atomic_write_bytes, atomic_write_text
from volumetric.data.source import Entry, ScanSource
from volumetric.errors import VolumetricError

CLASSES = ("no_lesion", "lesion")  # class i % 2 of scan i; "lesion" scans carry a brighter blob
DATA_VERSION = 1  # of the generated scans: another version regenerates them
WAIT_TARGET = 0.10  # share of epoch 2's training loop spent waiting for data
MEMORY_TARGET = 0.10  # peak memory with all scans vs half of them
EPOCHS = 2  # the first fills or first reads the cache, the second reads it back


@dataclass
class DataBenchSettings:
    """Sizes of the data benchmark; the defaults are the real run, a test shrinks them."""

    scans: int = 24
    data_dir: Path | None = None  # keeps the generated scans (reused when they match); None: temp
    in_plane: int = 512  # voxels along x and y
    depth_range: tuple[int, int] = (200, 300)  # voxels along z, drawn per scan
    spacing: tuple[float, float, float] = (0.7, 0.7, 1.0)  # mm
    target_spacing: float = 1.5  # mm, the preprocessing's resampling
    patch: int = 8
    embed_dim: int = 192
    depth: int = 4
    heads: int = 6
    seed: int = 0
    device: str = "cpu"
    threads: int | None = None  # torch threads (default: torch's choice)
    sample_every_s: float = 0.2  # memory sampling interval


# ------------------------------------------------------------------------------------ the scans


def phantom(rng: np.random.Generator, shape: tuple[int, int, int], spacing, lesion: bool):
    """A (W, H, D) int16 CT-like volume in HU: air −1000 around an elliptic body of soft tissue
    (~40) with a fat rim (−90), lungs (−850) in the upper part, spine and ribs (700), noise of
    12 HU; ``lesion`` adds a brighter blob (+80) in the abdomen. Vectorized, and 3D only where
    the anatomy varies along z: per-voxel Python would dominate the whole benchmark."""
    w, h, d = shape
    x = ((np.arange(w, dtype=np.float32) - w / 2) * spacing[0])[:, None]  # (W, 1) mm
    y = ((np.arange(h, dtype=np.float32) - h / 2) * spacing[1])[None, :]  # (1, H) mm
    z = np.arange(d, dtype=np.float32) * spacing[2]  # (D,) mm
    half = min(w * spacing[0], h * spacing[1]) / 2  # mm, half the field of view
    swell = 1 + 0.06 * np.sin(z / (d * spacing[2]) * np.pi)  # (D,): widest mid-scan
    r2 = ((x / (0.88 * half)) ** 2 + (y / (0.62 * half)) ** 2)[:, :, None] / swell**2  # (W, H, D)
    hu = np.full(shape, -1000.0, dtype=np.float32)
    hu[r2 < 1] = -90.0  # fat rim
    hu[r2 < 0.82] = 40.0  # soft tissue
    chest = slice(int(0.45 * d) + 1, None)  # the upper slices
    for side in (-1, 1):
        lung = ((x - side * 0.4 * half) / (0.28 * half)) ** 2 + (y / (0.38 * half)) ** 2 < 1
        hu[lung, chest] = -850.0  # lung: (W, H) mask
    hu[x**2 + (y + 0.45 * half) ** 2 < (0.08 * half) ** 2, :] = 700.0  # spine
    ribs = np.flatnonzero((np.sin(z * 2 * np.pi / 25) > 0.4) & (np.arange(d) > 0.45 * d))
    ring = hu[:, :, ribs]  # (W, H, R), a copy
    ring[(r2[:, :, ribs] > 0.74) & (r2[:, :, ribs] < 0.8)] = 700.0
    hu[:, :, ribs] = ring
    if lesion:
        centre = rng.uniform([-0.3, -0.1, 0.15], [0.3, 0.3, 0.4]) * [half, half, d * spacing[2]]
        radius = rng.uniform(0.08, 0.14) * half
        _add_ball(hu, (x.ravel(), y.ravel(), z), centre, radius, 80.0)
    hu += rng.standard_normal(shape, dtype=np.float32) * 12.0
    return np.clip(hu, -1024, 3071, out=hu).astype(np.int16)


def _add_ball(volume: np.ndarray, axes, centre, radius: float, value: float) -> None:
    """Add ``value`` inside a ball (mm), computed in its bounding box only."""
    boxes, squares = [], []
    for coords, c in zip(axes, centre):  # coords: (n,) mm along one axis
        inside = np.flatnonzero(np.abs(coords - c) < radius)
        if not len(inside):
            return
        boxes.append(slice(inside[0], inside[-1] + 1))
        squares.append((coords[boxes[-1]] - c) ** 2)
    dx2, dy2, dz2 = squares
    ball = dx2[:, None, None] + dy2[None, :, None] + dz2[None, None, :] < radius**2  # (bx, by, bz)
    volume[tuple(boxes)][ball] += value


def write_scan(path: Path, volume: np.ndarray, spacing) -> None:
    """Save an int16 (W, H, D) volume as .nii.gz, RAS, centred in x and y, atomically (a killed
    generation leaves no truncated scan to be reused); gzip level 1, as nibabel writes."""
    import nibabel as nib

    w, h, _ = volume.shape
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = [-w * spacing[0] / 2, -h * spacing[1] / 2, 0.0]
    image = nib.Nifti1Image(volume, affine)
    image.set_data_dtype(np.int16)
    image.header.set_xyzt_units("mm")
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    atomic_write_bytes(path, gzip.compress(image.to_bytes(), compresslevel=1))


def generate(settings: DataBenchSettings, folder: Path) -> tuple[list[tuple[Path, str]], bool]:
    """(path, class) of ``settings.scans`` scans under ``folder``/<class>/, generated unless the
    folder already holds them from the same recipe; returns them and whether all were reused."""
    recipe = {
        "version": DATA_VERSION,
        "in_plane": settings.in_plane,
        "depth_range": list(settings.depth_range),
        "spacing": list(settings.spacing),
        "seed": settings.seed,
    }
    record = folder / "bench_data.json"
    same = record.exists() and json.loads(record.read_text()) == recipe
    items, reused = [], True
    for i in range(settings.scans):
        label = CLASSES[i % 2]
        path = folder / label / f"scan_{i:03d}.nii.gz"
        items.append((path, label))
        if same and path.exists():
            continue
        reused = False
        rng = np.random.default_rng([settings.seed, i])
        depth = int(rng.integers(settings.depth_range[0], settings.depth_range[1] + 1))
        shape = (settings.in_plane, settings.in_plane, depth)
        write_scan(path, phantom(rng, shape, settings.spacing, lesion=i % 2 == 1), settings.spacing)
    atomic_write_text(record, json.dumps(recipe) + "\n")
    return items, reused


def split(items: list[tuple[Path, str]]) -> tuple[list, list]:
    """Training and validation items: pairs 3, 7, 11, ... (one scan of each class) validate, so
    every run and the MONAI anchor see the same split, and half the scans split alike."""
    val = [item for i, item in enumerate(items) if i // 2 % 4 == 3]
    return [item for i, item in enumerate(items) if i // 2 % 4 != 3], val


# ----------------------------------------------------------------------------- instrumentation


class MemorySampler:
    """Peak summed private memory (USS, bytes) of this process and all its children, per phase,
    sampled every ``interval`` seconds by a thread while the ``with`` block runs."""

    def __init__(self, interval: float):
        self.interval, self.phase = interval, "start"
        self.peaks: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> MemorySampler:
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def sample(self) -> None:
        import psutil

        me = psutil.Process()
        total = 0
        for process in [me, *me.children(recursive=True)]:
            try:
                total += process.memory_full_info().uss
            except (psutil.NoSuchProcess, psutil.AccessDenied, ProcessLookupError):
                continue  # a worker that just exited
        self.peaks[self.phase] = max(self.peaks.get(self.phase, 0), total)

    def peak(self) -> int:
        return max(self.peaks.values(), default=0)


class TimedLoader:
    """A DataLoader stand-in that records, per pass (epoch), the seconds spent inside the
    loader (starting its iterator and every ``next()``) and the whole loop; anything else is
    the wrapped loader's."""

    def __init__(self, loader, epochs: list[dict[str, float]], on_epoch: Callable[[int], None]):
        self.loader, self.epochs, self.on_epoch = loader, epochs, on_epoch

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.loader, name)

    def __iter__(self) -> Iterator[Any]:
        record = {"started": time.perf_counter(), "wait": 0.0, "batches": 0}
        self.epochs.append(record)
        self.on_epoch(len(self.epochs))
        iterator = iter(self.loader)  # worker start-up counts as waiting
        record["wait"] += time.perf_counter() - record["started"]
        while True:
            start = time.perf_counter()
            batch = next(iterator, None)
            record["wait"] += time.perf_counter() - start
            if batch is None:
                break
            record["batches"] += 1
            yield batch
        record["loop"] = time.perf_counter() - record["started"]


def instrumented(memory: MemorySampler) -> tuple[Callable, list[dict[str, float]]]:
    """A ``loader_hook`` for `train` that wraps the training loader in a `TimedLoader` naming the
    memory phases (epoch1, ...), and the list its per-epoch records go to. The phase before the
    first batch, set here, is the pre-flight."""
    epochs: list[dict[str, float]] = []
    memory.phase = "preflight"

    def phase(epoch: int) -> None:
        memory.phase = f"epoch{epoch}"

    def hook(loader):
        return TimedLoader(loader, epochs, phase)

    return hook, epochs


# --------------------------------------------------------------------------------------- runs


def bench_config(settings: DataBenchSettings, workers: int | str):
    """The run's config: 1.5-mm CT preprocessing on the native grid padded to a patch multiple
    (``target_shape`` None, so batch 1), the seq-norm ViT, disk cache."""
    from volumetric.config import config_from_dict

    return config_from_dict(
        {
            "model": {
                "arch": "vit3d",
                "attention": "seqnorm",
                "patch_size": settings.patch,
                "embed_dim": settings.embed_dim,
                "depth": settings.depth,
                "num_heads": settings.heads,
                "grad_checkpointing": False,
            },
            "data": {
                "spacing": settings.target_spacing,
                "target_shape": None,
                "intensity": "ct",
                "ct_window": [-1000.0, 1000.0],
            },
            "train": {
                "epochs": EPOCHS,
                "batch_size": 1,
                "num_workers": workers,
                "cache": "disk",
                "device": settings.device,
                "seed": settings.seed,
            },
        }
    )


def train_run(settings, train_items, val_items, out: Path, cache: Path, workers) -> dict[str, Any]:
    """One instrumented `train` (fresh run folder ``out``, disk cache ``cache``): its pre-flight
    and epoch seconds, epoch 2's data wait and scans per second, peak private memory."""
    from volumetric.engine.train import train

    config = bench_config(settings, workers)
    with MemorySampler(settings.sample_every_s) as memory:
        hook, epochs = instrumented(memory)
        started = time.perf_counter()
        entries = [
            [Entry(ScanSource.of(path), label) for path, label in items]
            for items in (train_items, val_items)
        ]
        train(
            config, entries[0], entries[1], out, progress=False, cache_dir=cache, loader_hook=hook
        )
    gc.collect()  # the run's persistent DataLoader workers exit now, not in the next run's samples
    with (out / "metrics.csv").open(newline="") as handle:
        seconds = [float(row["seconds"]) for row in csv.DictReader(handle)]  # one per epoch
    last = epochs[-1]
    summary = json.loads((out / "dataset_summary.json").read_text())
    return {
        "preflight_s": epochs[0]["started"] - started,
        "epoch_s": seconds,
        "wait_share": last["wait"] / last["loop"],
        "scans_per_s": (len(train_items) + len(val_items)) / seconds[-1],
        "peak_mib": memory.peak() / 2**20,
        "preflight_peak_mib": memory.peaks.get("preflight", 0) / 2**20,
        "preprocessed_shape": summary["preprocessed_shape"],
    }


def monai_loader(settings, items, cache: Path, shuffle: bool, workers: int):
    """MONAI's PersistentDataset (cache in ``cache``) and DataLoader, with this benchmark's
    preprocessing written as MONAI transforms; the loader keeps its defaults otherwise, as a
    plain MONAI script would (its workers start afresh every epoch)."""
    from monai import transforms as mt
    from monai.data import DataLoader, PersistentDataset

    s = "image"
    preprocess = mt.Compose(
        [
            mt.LoadImaged(keys=s, image_only=True),
            mt.EnsureChannelFirstd(keys=s),
            mt.Orientationd(keys=s, axcodes="RAS", labels=None),  # NIfTI: RAS space
            mt.Spacingd(keys=s, pixdim=[settings.target_spacing] * 3, mode="bilinear"),
            mt.ScaleIntensityRanged(keys=s, a_min=-1000, a_max=1000, b_min=0, b_max=1, clip=True),
            mt.DivisiblePadd(keys=s, k=settings.patch),
        ]
    )
    data = [{"image": str(path), "label": CLASSES.index(label)} for path, label in items]
    dataset = PersistentDataset(data, transform=preprocess, cache_dir=cache)
    return DataLoader(dataset, batch_size=1, shuffle=shuffle, num_workers=workers)


def monai_run(settings, train_items, val_items, cache: Path) -> dict[str, Any]:
    """The anchor: MONAI's loaders feeding the same model, a plain AdamW + cross-entropy loop
    with a validation pass per epoch (as `train` does), on an empty MONAI cache. The model gets
    plain tensors (`_plain`): the comparison is of data pipelines, not of MetaTensor."""
    from volumetric.models.registry import build_model, model_arguments

    workers = parallel_workers()
    config = bench_config(settings, workers)
    train_loader = monai_loader(settings, train_items, cache, True, workers)
    val_loader = monai_loader(settings, val_items, cache, False, workers)
    torch.manual_seed(settings.seed)
    model = build_model("vit3d", model_arguments("vit3d", asdict(config.model), len(CLASSES)))
    model = model.to(settings.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.train.lr)
    criterion, seconds = torch.nn.CrossEntropyLoss(), []
    with MemorySampler(settings.sample_every_s) as memory:
        for _ in range(EPOCHS):
            start = time.perf_counter()
            model.train()
            for batch in train_loader:
                images = _plain(batch["image"]).to(settings.device)  # (1, 1, W, H, D)
                loss = criterion(model(images), batch["label"].to(settings.device))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            model.eval()
            with torch.no_grad():
                for batch in val_loader:
                    model(_plain(batch["image"]).to(settings.device))
            seconds.append(time.perf_counter() - start)
    return {"epoch_s": seconds, "peak_mib": memory.peak() / 2**20}


def _plain(tensor: torch.Tensor) -> torch.Tensor:
    """A MetaTensor's plain tensor (a plain tensor as it is)."""
    return tensor.as_tensor() if hasattr(tensor, "as_tensor") else tensor


def inference_run(checkpoint: Path, scans: list[Path], device: str, out: Path) -> dict[str, float]:
    """Scans per second of `predict_to_csv` (what ``volumetric-infer`` runs, with its defaults)
    and of a plain loop calling a `Predictor` once per scan; both include loading the checkpoint."""
    from volumetric.data.discovery import inference_inputs
    from volumetric.inference import PredictionError, Predictor, predict_to_csv

    start = time.perf_counter()
    predictor = Predictor(checkpoint, device=device)
    results = predict_to_csv(predictor, inference_inputs(scans), out, progress=False)
    cli_s = time.perf_counter() - start
    failed = [r for r in results if isinstance(r, PredictionError)]
    if failed:
        raise VolumetricError(f"inference failed on a benchmark scan: {failed[0].reason}")
    start = time.perf_counter()
    predictor = Predictor(checkpoint, device=device)
    for scan in scans:
        predictor(scan)
    loop_s = time.perf_counter() - start
    return {"cli": len(scans) / cli_s, "loop": len(scans) / loop_s}


# ------------------------------------------------------------------------------------ the bench


FIGURES = {  # key: (what, unit, target)
    "preflight_s": ("pre-flight on an empty cache (`train()` call to first step)", "s", None),
    "epoch1_s": ("epoch 1, first from the cache (metrics.csv `seconds`)", "s", None),
    "epoch2_s": ("epoch 2 (metrics.csv `seconds`)", "s", None),
    "data_wait_share": ("epoch 2: share of the training loop waiting for data", "%", "≤ 10 %"),
    "scans_per_s_workers0": ("epoch 2 scans/s, `num_workers: 0`", "scans/s", None),
    "scans_per_s_auto": ("epoch 2 scans/s, with loading workers", "scans/s", None),
    "peak_half_mib": ("peak private memory (USS, main + workers), half the scans", "MiB", None),
    "peak_full_mib": (
        "peak private memory (USS, main + workers), all scans",
        "MiB",
        "within 10 % of half",
    ),
    "monai_epoch1_s": ("MONAI PersistentDataset, epoch 1", "s", None),
    "monai_epoch2_s": ("MONAI PersistentDataset, epoch 2", "s", "≥ ours (epoch 2)"),
    "infer_cli_scans_per_s": ("`volumetric-infer`", "scans/s", None),
    "infer_loop_scans_per_s": ("`Predictor(...)(path)` loop, one scan at a time", "scans/s", None),
}


def parallel_workers() -> int:
    """The loading processes measured against none: what ``auto`` gives on a machine of more
    than two CPUs, and at least one (on two CPUs ``auto`` itself means none)."""
    from volumetric.data.loading import MAX_AUTO_WORKERS, available_cpus

    return max(1, min(MAX_AUTO_WORKERS, available_cpus() - 1))


def run_data_bench(settings: DataBenchSettings) -> dict[str, Any]:
    """Every figure of `FIGURES` (floats), and under ``info`` what the report says besides."""
    if settings.scans < 4:  # half of them must still hold both classes
        raise VolumetricError(f"--data-scans {settings.scans}: at least 4 are needed")
    if settings.threads:
        torch.set_num_threads(settings.threads)
    with tempfile.TemporaryDirectory(prefix="volumetric-data-bench-") as tmp:
        work = Path(tmp)
        folder = Path(settings.data_dir) if settings.data_dir else work / "scans"
        start = time.perf_counter()
        items, reused = generate(settings, folder)
        generate_s = time.perf_counter() - start
        train_items, val_items = split(items)
        workers = parallel_workers()
        auto = train_run(settings, train_items, val_items, work / "auto", work / "cache", workers)
        serial = train_run(settings, train_items, val_items, work / "serial", work / "cache", 0)
        half_train, half_val = split(items[: len(items) // 2])
        half = train_run(settings, half_train, half_val, work / "half", work / "cache2", workers)
        monai = monai_run(settings, train_items, val_items, work / "monai-cache")
        scans = [path for path, _ in items]
        infer = inference_run(work / "auto" / "best.pt", scans, settings.device, work / "p.csv")
    info = {
        "scans": len(items),
        "train_scans": len(train_items),
        "val_scans": len(val_items),
        "half_scans": len(half_train) + len(half_val),
        "generate_s": generate_s,
        "reused": reused,
        "auto_workers": workers,
        "preprocessed_shape": auto["preprocessed_shape"],
        "wait_share_workers0": serial["wait_share"],
        "preflight_peak_mib": auto["preflight_peak_mib"],
        "monai_peak_mib": monai["peak_mib"],
    }
    return {**_figures(auto, serial, half, monai, infer), "info": info}


def _figures(auto, serial, half, monai, infer) -> dict[str, float]:
    return {
        "preflight_s": auto["preflight_s"],
        "epoch1_s": auto["epoch_s"][0],
        "epoch2_s": auto["epoch_s"][1],
        "data_wait_share": auto["wait_share"],
        "scans_per_s_workers0": serial["scans_per_s"],
        "scans_per_s_auto": auto["scans_per_s"],
        "peak_half_mib": half["peak_mib"],
        "peak_full_mib": auto["peak_mib"],
        "monai_epoch1_s": monai["epoch_s"][0],
        "monai_epoch2_s": monai["epoch_s"][1],
        "infer_cli_scans_per_s": infer["cli"],
        "infer_loop_scans_per_s": infer["loop"],
    }


# ---------------------------------------------------------------------------------- the report


def targets(result: dict[str, Any]) -> dict[str, bool]:
    """Whether each target is met, by the figure that carries it."""
    growth = result["peak_full_mib"] / result["peak_half_mib"] - 1
    return {
        "data_wait_share": result["data_wait_share"] <= WAIT_TARGET,
        "peak_full_mib": abs(growth) <= MEMORY_TARGET,
        "monai_epoch2_s": result["epoch2_s"] <= result["monai_epoch2_s"],
    }


def _value(key: str, value: float) -> str:
    unit = FIGURES[key][1]
    if unit == "%":
        return f"{100 * value:.1f} %"
    if unit == "MiB":
        return f"{value:,.0f} MiB"
    return f"{value:.3g} {unit}"


def table_rows(result: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(figure, measured, target, met) for every figure, in `FIGURES` order."""
    met = targets(result)
    rows = []
    for key, (what, _, target) in FIGURES.items():
        status = "–" if key not in met else ("met" if met[key] else "not met")
        rows.append((what, _value(key, result[key]), target or "–", status))
    return rows


def sentences(result: dict[str, Any]) -> list[str]:
    """One plain sentence per target, and one each on the worker count and on inference."""
    r, met, info = result, targets(result), result["info"]
    word = {True: "met", False: "not met"}
    growth = r["peak_full_mib"] / r["peak_half_mib"] - 1
    faster = info["auto_workers"] if r["scans_per_s_auto"] > r["scans_per_s_workers0"] else 0
    cli_faster = r["infer_cli_scans_per_s"] > r["infer_loop_scans_per_s"]
    return [
        f"Epoch 2 spent {100 * r['data_wait_share']:.1f} % of its training loop waiting for "
        f"data (target ≤ 10 %: {word[met['data_wait_share']]}).",
        f"`num_workers: {faster}` was faster in epoch 2: {r['scans_per_s_workers0']:.3g} scans/s "
        f"with 0, {r['scans_per_s_auto']:.3g} with {info['auto_workers']} worker(s).",
        f"Peak private memory was {r['peak_half_mib']:,.0f} MiB with {info['half_scans']} scans "
        f"and {r['peak_full_mib']:,.0f} MiB with {info['scans']}, {100 * growth:+.1f} % "
        f"(target within 10 %: {word[met['peak_full_mib']]}).",
        f"Epoch 2 took {r['epoch2_s']:.3g} s here and {r['monai_epoch2_s']:.3g} s through MONAI's "
        f"PersistentDataset (target no slower than MONAI: {word[met['monai_epoch2_s']]}).",
        f"`volumetric-infer` classified {r['infer_cli_scans_per_s']:.3g} scans/s, the "
        f"one-scan-at-a-time loop {r['infer_loop_scans_per_s']:.3g} "
        f"({'volumetric-infer' if cli_faster else 'the loop'} is faster).",
    ]


def data_markdown(result: dict[str, Any], settings: DataBenchSettings, command: str) -> str:
    """The report's section: command, machine, set-up, the table of figures, the sentences."""
    from volumetric.bench.report import machine_description

    info, s = result["info"], settings
    shape = info["preprocessed_shape"] or {"min": ["?"], "max": ["?"]}
    made = "reused" if info["reused"] else f"generated in {info['generate_s']:.0f} s"
    lines = [
        "## Data pipeline (`volumetric-bench --data`)",
        "",
        f"- command: `{command}`",
        f"- machine: {machine_description(s.device)}",
        f"- data: {info['scans']} generated CT-like int16 .nii.gz scans of {s.in_plane}×"
        f"{s.in_plane}×({s.depth_range[0]}–{s.depth_range[1]}) voxels at "
        f"{'×'.join(f'{v:g}' for v in s.spacing)} mm, two classes "
        f"({made})",
        f"- preprocessing: {s.target_spacing:g} mm, CT window −1000..1000 HU → [0, 1], native "
        f"grid padded to a multiple of {s.patch}: (C, W, H, D) from {shape['min']} to "
        f"{shape['max']}",
        f"- training: seq-norm `vit3d`, width {s.embed_dim}, depth {s.depth}, {s.heads} heads, "
        f"patch {s.patch}, batch 1, {EPOCHS} epochs, {info['train_scans']} training and "
        f"{info['val_scans']} validation scans (half: {info['half_scans']}), `train.cache: disk` "
        f"empty at the start, {info['auto_workers']} loading worker(s) unless said otherwise",
        "",
        "| figure | measured | target | met |",
        "|---|---:|---|---|",
        *(
            f"| {what} | {value} | {target} | {met} |"
            for what, value, target, met in table_rows(result)
        ),
        "",
        *sentences(result),
        "",
        f"Besides: epoch 2 waited for data {100 * info['wait_share_workers0']:.1f} % of its "
        f"training loop with `num_workers: 0`; peak private memory was "
        f"{info['preflight_peak_mib']:,.0f} MiB during the pre-flight (all scans) and "
        f"{info['monai_peak_mib']:,.0f} MiB in the MONAI run. Peaks are over the whole run, "
        f"pre-flight included, each on an empty cache, sampled every {s.sample_every_s:g} s.",
        "",
    ]
    return "\n".join(lines)


def console_lines(result: dict[str, Any]) -> list[str]:
    """The figures as the console prints them."""
    lines = [
        f"{what}: {value} (target {target}; {met})"
        for what, value, target, met in table_rows(result)
    ]
    return lines + [
        f"pre-flight peak private memory: {result['info']['preflight_peak_mib']:,.0f} MiB"
    ]


def finite_and_positive(result: dict[str, Any]) -> bool:
    """Whether every figure is a finite positive number (what a complete run gives)."""
    return all(math.isfinite(result[key]) and result[key] > 0 for key in FIGURES)


def run_and_report(settings: DataBenchSettings, output: Path, command: str, marker: str) -> dict:
    """``volumetric-bench --data``: run, print the figures, write the section into ``output``
    between the ``marker`` lines (volumetric/bench/report.py)."""
    from volumetric.bench.report import write_markdown

    result = run_data_bench(settings)
    for line in console_lines(result):
        print(line)
    write_markdown(Path(output), data_markdown(result, settings, command), marker)
    print(f"wrote {output}")
    return result
