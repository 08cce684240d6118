"""Built-in model names -> their shipped checkpoint directories, and the one rule that turns a
`--model` value (or `dvlm.load`'s argument) into a checkpoint directory."""

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


def resolve_model(name_or_path: str | Path) -> Path:
    """A model as every verb takes it: an existing path as it is, else a built-in model's name.

    Raises:
        FileNotFoundError: neither reading fits, in one line naming both (and the built-in names)."""
    path = Path(name_or_path)
    if path.exists():
        return path
    found = builtin_path(str(name_or_path))
    if found is None:
        names = builtin_names()
        known = f"built-in models: {', '.join(names)}" if names else "no built-in model is installed"
        raise FileNotFoundError(f"model {str(name_or_path)!r}: no such directory and no built-in model of that "
                                f"name ({known})")
    return found
