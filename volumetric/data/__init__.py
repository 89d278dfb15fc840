"""Finding scans and labels on disk, splitting them, and serving preprocessed volumes."""

from volumetric.data.dataset import ScanDataset, load_subject
from volumetric.data.discovery import discover, find_scans
from volumetric.data.split import stratified_split

__all__ = ["ScanDataset", "discover", "find_scans", "load_subject", "stratified_split"]
