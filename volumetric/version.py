"""The package's version, in a module of its own so that modules inside the package need not
import the package's ``__init__`` (and setup.cfg reads it without importing anything)."""

__version__ = "0.1.0"
