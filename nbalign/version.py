"""The package version, in a module of its own so that any layer can record it (spec.json) without
importing the package's top."""

__version__ = "0.1.0"
