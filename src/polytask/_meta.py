"""Facts about the installed package, for provenance records."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

__all__ = ["package_version"]


def package_version() -> str:
    """The installed polytask version ("unknown" when run from an uninstalled tree)."""
    try:
        return version("polytask")
    except PackageNotFoundError:
        return "unknown"
