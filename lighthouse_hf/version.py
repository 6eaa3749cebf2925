"""The package version, importable without importing anything else of lighthouse_hf."""

__version__ = "0.1.0"
