"""Local copies of models and data sets, for machines without the Hugging Face Hub.

They are found only through ``$TQCOMPRESSOR_ASSETS`` (a folder laid out like this project's shared
assets: ``house-teacher/``, ``eval/wikitext-2-raw/``, ...); nothing is guessed from where the package
is installed. Without it, named data sets come from the Hub and models must be named explicitly."""

from __future__ import annotations

import os
from pathlib import Path

ENV = "TQCOMPRESSOR_ASSETS"


def assets_dir() -> Path | None:
    value = os.environ.get(ENV)
    if not value:
        return None
    path = Path(value).expanduser()
    if not path.is_dir():
        raise ValueError(f"{ENV}={value} is not a directory")
    return path


def local_asset(relative: str) -> Path | None:
    """``$TQCOMPRESSOR_ASSETS/relative`` when it exists."""
    folder = assets_dir()
    return folder / relative if folder is not None and (folder / relative).exists() else None


def default_model(flag: str) -> str:
    """The house teacher from the assets folder, for a command run without ``flag``."""
    path = local_asset("house-teacher")
    if path is None:
        raise ValueError(
            f"pass {flag} (a Hugging Face name or directory), or set {ENV} to a folder with house-teacher/"
        )
    return str(path)
