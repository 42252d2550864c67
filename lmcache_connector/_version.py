"""The package version, kept in one place for setup.py, the CLI and the Helm chart."""

__version__ = "0.1.0"
