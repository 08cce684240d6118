"""Built-in model names -> their shipped checkpoint directories."""

from __future__ import annotations

from pathlib import Path

WEIGHTS_DIR = Path(__file__).parent / "weights"


def builtin_names() -> list[str]:
    if not WEIGHTS_DIR.is_dir():
        return []
    return sorted(p.name for p in WEIGHTS_DIR.iterdir() if (p / "config.json").is_file())


def builtin_path(name: str) -> Path | None:
    """The directory of a built-in model, by its exact name (never a path: "../x" is no name)."""
    return WEIGHTS_DIR / name if name in builtin_names() else None
