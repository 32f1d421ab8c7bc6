"""The package version, in one place: ``repa.__version__`` and the build metadata read it here."""

__version__ = "0.1.0"
