"""Disk cache of preprocessed volumes: each scan is read and preprocessed once, then memory-mapped.

An entry is one preprocessed scan, stored as two files under the cache folder:

    volumes/<key[:2]>/<key>.npy     the (C, W, H, D) volume, float16 or float32 (numpy .npy)
    volumes/<key[:2]>/<key>.json    its affine, dtype, shape, source path and creation time

``key`` hashes the identity of every file the scan is made of (resolved path, size, modification
time: every file of a DICOM series, the data file beside a detached header) together with
a fingerprint of the preprocessing (the settings a checkpoint records, the number of channels, the
TorchIO, SimpleITK and nibabel versions, and this cache's own format version). A changed file or a
changed setting gives another key: the old entry is never read again (``volumetric-cache clear
--older-than DAYS`` frees it).

Why numpy .npy files: `numpy.load(mmap_mode="r")` maps them without reading them, so the memory
a training run holds does not grow with the data set, and the OS shares the pages between
DataLoader workers. MONAI's PersistentDataset pickles each item with torch.save and reads it back
whole, and keys it on the transform chain rather than on the files, so it could neither map nor
notice a changed scan. safetensors would map too, but is one more dependency for what a 128-byte
.npy header already does.

Precision: volumes normalized by the preprocessing (``intensity`` zscore, ct or minmax) are stored
as float16, half the bytes of float32; raw intensities (``intensity: none``) stay float32, since
float16 would round HU in the thousands to steps of 0.5 to 2. The float16 rounding error is
|x̃ − x| ≤ 2⁻¹¹·|x| (relative 4.9·10⁻⁴) for |x| ≥ 2⁻¹⁴, and at most 2⁻²⁵ below: for a CT window
mapped onto [0, 1] that is under 0.5 HU of a 2000 HU window; for a z-score of 5, 0.0025.
Values beyond float16's range (|x| > 65504) make that entry float32.

Writes are atomic (a temporary file renamed into place, the .json before the .npy, which is the
entry's commit point), so a killed run or two runs sharing the cache never read half an entry; an
entry that fails to load is rebuilt with a warning.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from volumetric.atomic_files import atomic_path, atomic_write_text
from volumetric.data.dicom import series_files
from volumetric.data.source import ImageRef, ScanSource
from volumetric.errors import VolumetricError

log = logging.getLogger(__name__)

CACHE_FORMAT = 1
COMPACT_INTENSITIES = ("zscore", "ct", "minmax")  # normalized values: float16 is enough
FLOAT16_MAX = 65504.0


def default_cache_dir() -> Path:
    """``VOLUMETRIC_CACHE``, else ``$XDG_CACHE_HOME/volumetric``, else ``~/.cache/volumetric``."""
    if os.environ.get("VOLUMETRIC_CACHE"):
        return Path(os.environ["VOLUMETRIC_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "volumetric"


def scan_files(image: Path | ImageRef) -> list[Path]:
    """Every file an image is made of: the files of its series when it names one, else those of a
    series folder, or the file itself and, for a detached header (.mhd, .nhdr, Analyze .hdr), the
    data files beside it with the same stem."""
    if isinstance(image, ImageRef) and image.series_uid is not None:
        files = series_files(image.path, image.series_uid)
        if files:  # else gone: the whole folder makes a new key, and reading it says what is amiss
            return sorted(files)
    scan = Path(image.path if isinstance(image, ImageRef) else image)
    if scan.is_dir():
        return sorted(p for p in scan.iterdir() if p.is_file() and not p.name.startswith("."))
    files = [scan]
    if scan.name.lower().endswith((".mhd", ".nhdr", ".hdr")):
        stem = scan.name.split(".")[0]
        files += sorted(
            p
            for p in scan.parent.iterdir()
            if p != scan and p.is_file() and p.name.split(".")[0] == stem
        )
    return files


def file_identity(scan: Path | ScanSource) -> list[list[Any]]:
    """[resolved path, size, modification time in ns] of every file of every image of the scan,
    and the series picked out of a DICOM folder where there is one."""
    identity: list[list[Any]] = []
    for image in ScanSource.of(scan).images:
        if image.series_uid is not None:
            identity.append(["series", image.series_uid])
        for path in scan_files(image):
            stat = path.stat()
            identity.append([str(path.resolve()), stat.st_size, stat.st_mtime_ns])
    return identity


def preprocessing_fingerprint(settings: dict[str, Any], in_channels: int) -> str:
    """Hash of everything besides the files that decides what preprocessing makes of a scan."""
    import nibabel
    import SimpleITK
    import torchio

    key = {
        "cache_format": CACHE_FORMAT,
        "settings": settings,
        "in_channels": in_channels,
        "torchio": torchio.__version__,
        "SimpleITK": SimpleITK.Version_VersionString(),
        "nibabel": nibabel.__version__,
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()


@dataclass(frozen=True)
class DiskCache:
    """Preprocessed volumes of one preprocessing, under ``root``."""

    root: Path
    fingerprint: str
    compact: bool  # store float16 where the values allow

    @classmethod
    def for_preprocessing(
        cls, root: Path | None, settings: dict[str, Any], in_channels: int
    ) -> DiskCache:
        compact = settings.get("intensity", "zscore") in COMPACT_INTENSITIES
        fingerprint = preprocessing_fingerprint(settings, in_channels)
        return cls(Path(root) if root else default_cache_dir(), fingerprint, compact)

    def entry(self, scan: Path | ScanSource) -> Path:
        """The .npy path of ``scan``'s entry (its .json sits beside it)."""
        text = json.dumps([self.fingerprint, file_identity(scan)])
        key = hashlib.sha256(text.encode()).hexdigest()
        return self.root / "volumes" / key[:2] / f"{key}.npy"

    def load(self, scan: Path | ScanSource) -> tuple[torch.Tensor, np.ndarray] | None:
        """(C, W, H, D) float32 volume and its affine, or None when not cached (or unreadable,
        with a warning: the caller rebuilds it). The volume is read through a memory map."""
        path = self.entry(scan)
        if not path.exists():
            return None
        try:
            meta = json.loads(path.with_suffix(".json").read_text())
            mapped = np.load(path, mmap_mode="r")  # (C, W, H, D), not read yet
            if list(mapped.shape) != meta["shape"]:
                raise ValueError(f"shape {mapped.shape} differs from its record {meta['shape']}")
            data = torch.from_numpy(np.array(mapped, dtype=np.float32))  # a copy, read once
            affine = np.asarray(meta["affine"], dtype=np.float64)
        except (OSError, ValueError, KeyError, TypeError) as error:
            log.warning("%s: cache entry %s unreadable (%s); rebuilding it", scan, path, error)
            return None
        record = path.with_suffix(".json")
        if time.time() - record.stat().st_mtime > 3600:  # last use, for clear --older-than;
            os.utime(record)  # to the hour: not a metadata write per item and epoch
        return data, affine

    def store(
        self, scan: Path | ScanSource, data: torch.Tensor, affine: np.ndarray
    ) -> torch.Tensor:
        """Write ``scan``'s preprocessed (C, W, H, D) volume atomically; returns it as stored
        (float16-rounded where compact), so that its first use equals every later one."""
        path = self.entry(scan)
        array = data.detach().cpu().numpy()
        if self.compact and np.abs(array).max(initial=0.0) <= FLOAT16_MAX:
            array = array.astype(np.float16)
        meta = {
            "source": str(scan),
            "shape": list(array.shape),
            "dtype": str(array.dtype),
            "affine": np.asarray(affine, dtype=np.float64).tolist(),
            "created": time.time(),
        }
        try:
            atomic_write_text(path.with_suffix(".json"), json.dumps(meta) + "\n")
            with atomic_path(path) as tmp, open(tmp, "wb") as handle:
                np.save(handle, array)
        except OSError as error:
            raise VolumetricError(
                f"cannot write the cache in {self.root} ({error.strerror or error}); "
                "set --cache-dir or VOLUMETRIC_CACHE, or train.cache: memory"
            ) from None
        return torch.from_numpy(array.astype(np.float32))


def disk_cache_for(
    mode: str, root: str | Path | None, settings: dict[str, Any], in_channels: int
) -> DiskCache | None:
    """The DiskCache a data set of cache ``mode`` uses: one for ``disk``, None otherwise."""
    if mode != "disk":
        return None
    return DiskCache.for_preprocessing(Path(root) if root else None, settings, in_channels)


def entry_bytes(shape: tuple[int, ...], compact: bool) -> int:
    """Bytes of an entry of this (C, W, H, D) shape (the .npy header and .json besides)."""
    return int(np.prod(shape, dtype=np.int64)) * (2 if compact else 4) + 1024


@dataclass(frozen=True)
class CacheSummary:
    entries: int
    bytes: int
    oldest_use: float | None  # seconds since the epoch, of the entry used longest ago
    newest_use: float | None


def _entries(root: Path) -> list[Path]:
    """The .npy files of every complete or half-written entry under ``root``."""
    volumes = Path(root) / "volumes"
    return sorted(volumes.glob("*/*.npy")) if volumes.is_dir() else []


def _last_use(entry: Path) -> float:
    record = entry.with_suffix(".json")
    return (record if record.exists() else entry).stat().st_mtime


def summarize(root: Path) -> CacheSummary:
    """Entries, their size on disk and their last uses (``volumetric-cache info``)."""
    entries = _entries(root)
    uses = [_last_use(e) for e in entries]
    size = sum(e.stat().st_size + _size(e.with_suffix(".json")) for e in entries)
    return CacheSummary(len(entries), size, min(uses, default=None), max(uses, default=None))


def _size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


def clear(root: Path, older_than_days: float | None = None) -> tuple[int, int]:
    """Delete the entries not used for ``older_than_days`` days (all without it), and temporary
    files a killed run left over a day ago; returns (entries deleted, bytes freed)."""
    cutoff = time.time() - older_than_days * 86400 if older_than_days is not None else None
    removed = freed = 0
    for entry in _entries(root):
        if cutoff is not None and _last_use(entry) >= cutoff:
            continue
        # the .npy, the entry's commit point, goes first: no reader finds a half-deleted entry
        for path in (entry, entry.with_suffix(".json")):
            if path.exists():
                freed += path.stat().st_size
                path.unlink()
        removed += 1
    day_ago = time.time() - 86400  # younger temporary files may belong to a run writing now
    for tmp in (Path(root) / "volumes").glob("*/.*.tmp"):
        if tmp.stat().st_mtime < day_ago:
            freed += tmp.stat().st_size
            tmp.unlink()
    return removed, freed
