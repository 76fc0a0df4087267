"""Installed library versions, recorded in every plan and printed by ``fimlora env``."""

from __future__ import annotations

import importlib.metadata as metadata
import platform

__all__ = ["installed_version", "library_versions"]


def installed_version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def library_versions() -> dict[str, str]:
    return {"python": platform.python_version(),
            **{package: installed_version(package) for package in ("fimlora", "torch", "transformers", "peft")}}
