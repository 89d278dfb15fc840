"""ScanDataset: scans → preprocessed (and, for training, augmented) tensors.

Preprocessing is deterministic, so with ``cache=True`` each scan is read and preprocessed once and
kept in memory; augmentation is random and runs on every access.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
import torchio as tio
from torch.utils.data import Dataset

from volumetric.errors import VolumetricError

log = logging.getLogger(__name__)


def read_scan(path: Path) -> tio.ScalarImage:
    """Read a scan through TorchIO (orientation and spacing honoured); a VolumetricError if unreadable."""
    image = tio.ScalarImage(path)
    try:
        image.load()
    except Exception as error:  # nibabel, SimpleITK and TorchIO raise many types for a broken file
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise VolumetricError(f"{path}: cannot read scan ({reason})") from None
    return image


def load_subject(path: Path, preprocess: tio.Transform, in_channels: int = 1) -> tio.Subject:
    """Read and preprocess one scan into a Subject whose ``image`` is (C, W, H, D) float32."""
    image = read_scan(path)
    if image.num_channels != in_channels:
        raise VolumetricError(f"{path}: scan has {image.num_channels} channels, the model takes {in_channels}")
    subject = preprocess(tio.Subject(image=image))
    return subject


class ScanDataset(Dataset):
    """Items are dicts: image (C, W, H, D) float32, label (int, -1 when unknown), index (int)."""

    def __init__(
        self,
        items: list[tuple[Path, int]],
        preprocess: tio.Transform,
        *,
        augment: tio.Transform | None = None,
        cache: bool = False,
        in_channels: int = 1,
    ):
        self.items = items
        self.preprocess = preprocess
        self.augment = augment
        self.in_channels = in_channels
        self._cache: dict[int, tuple[torch.Tensor, Any]] | None = {} if cache else None

    def __len__(self) -> int:
        return len(self.items)

    def subject(self, index: int) -> tio.Subject:
        """The preprocessed (not augmented) subject of item ``index``."""
        if self._cache is not None and index in self._cache:
            data, affine = self._cache[index]
            return tio.Subject(image=tio.ScalarImage(tensor=data.clone(), affine=affine))
        subject = load_subject(self.items[index][0], self.preprocess, self.in_channels)
        if self._cache is not None:
            self._cache[index] = (subject.image.data, subject.image.affine)
        return subject

    def __getitem__(self, index: int) -> dict[str, Any]:
        subject = self.subject(index)
        if self.augment is not None:
            subject = self.augment(subject)
        return {"image": subject.image.data.float(), "label": self.items[index][1], "index": index}
