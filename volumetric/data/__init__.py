"""Finding scans and labels on disk, splitting them, and serving preprocessed volumes.

The modules are imported by name (volumetric.data.dataset, .discovery, .split, ...): the package
itself imports nothing, so that what needs only discovery or a config does not load TorchIO and
SimpleITK.
"""
