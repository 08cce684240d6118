"""Reading benchmark files from local disk: JSON, JSON lines, parquet (the Hugging Face layout).

The Hugging Face copies of the benchmarks (lmms-lab/*, MMMU/MMMU: what lmms-eval downloads) are
parquet files whose image columns hold `{"bytes": ..., "path": ...}` structs. Parquet needs
pyarrow (the `benchmarks` extra); JSON layouts need nothing.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

from dvlm.tasks.benchmarks.items import BenchmarkDataError

SPLIT_PREFIXES = ("train", "dev", "validation", "val", "test")


def read_text(path: Path) -> str:
    """A UTF-8 file's text; a missing, unreadable or undecodable file is one line naming it."""
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError as err:
        raise BenchmarkDataError(f"{path}: no such file") from err
    except IsADirectoryError as err:
        raise BenchmarkDataError(f"{path}: a folder, where a file was expected") from err
    except UnicodeDecodeError as err:
        raise BenchmarkDataError(f"{path}: not UTF-8 text ({err.reason})") from err
    except OSError as err:
        raise BenchmarkDataError(f"{path}: cannot read ({err.strerror or err})") from err


def read_json(path: Path) -> Any:
    try:
        return json.loads(read_text(path))
    except json.JSONDecodeError as err:
        raise BenchmarkDataError(f"{path}: not valid JSON ({err})") from err


def read_json_lines(path: Path) -> list[dict[str, Any]]:
    """One JSON object per line (blank lines skipped); a file holding one JSON list is read too."""
    text = read_text(path)
    if text.lstrip().startswith("["):
        return read_json(path)
    records = []
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise BenchmarkDataError(f"{path}, line {number}: not valid JSON ({err})") from err
    return records


def is_parquet(path: Path) -> bool:
    return path.suffix == ".parquet" or (path.is_dir() and any(path.rglob("*.parquet")))


def parquet_files(path: Path, split: str) -> list[Path]:
    """`path` itself, or the parquet files under a folder; of those named by split (`test-0000...`,
    `validation-...`), only `split`'s, as lmms-eval reads only its task's split."""
    if path.is_file():
        return [path]
    files = sorted(path.rglob("*.parquet"))
    named = [f for f in files if f.name.split("-")[0] in SPLIT_PREFIXES]
    chosen = [f for f in named if f.name.split("-")[0] == split] if named else files
    if not chosen:
        raise BenchmarkDataError(f"{path}: no {split} parquet files (found {', '.join(f.name for f in files[:5])})")
    return chosen


def parquet_rows(path: Path, split: str, columns: list[str] | None = None) -> Iterator[dict[str, Any]]:
    """The rows of the split's parquet files under `path`, as dicts."""
    for _, row in parquet_records(path, split, columns):
        yield row


def parquet_records(path: Path, split: str, columns: list[str] | None = None) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, row) for the rows of the split's parquet files under `path`; `where` names the file
    and the row ("<file>, row 7") for error messages."""
    try:
        import pyarrow.parquet as pq
    except ImportError as err:
        raise BenchmarkDataError("reading parquet files needs pyarrow: pip install 'dvlm[benchmarks]'") from err
    for file in parquet_files(path, split):
        table = pq.read_table(file)
        missing = [c for c in columns or [] if c not in table.column_names]
        if missing:
            raise BenchmarkDataError(f"{file}: no column(s) {', '.join(missing)}; "
                                     f"it has {', '.join(table.column_names)}")
        for number, row in enumerate(table.to_pylist()):
            yield f"{file}, row {number}", row


def config_folder(path: Path, config: str, others: tuple[str, ...]) -> Path:
    """The folder of one config of a multi-config Hugging Face download (`<root>/<config>/*.parquet`):
    `path/config` when `path` is the root; `path` itself otherwise, refused when its files lie in
    a folder named for one of the `others` configs (they would be read as this benchmark's)."""
    if (path / config).is_dir():
        return path / config
    files = [path] if path.is_file() else sorted(path.rglob("*.parquet"))
    foreign = sorted({part for file in files for part in file.parent.parts if part in others})
    if foreign:
        raise BenchmarkDataError(f"{path}: holds {', '.join(foreign)} files, not {config}'s; give the {config} folder "
                                 "of the download (or its root)")
    return path


def image_bytes(value: Any, where: str) -> bytes:
    """The encoded image of a parquet image cell (`{"bytes": b"..."}` or raw bytes)."""
    data = value.get("bytes") if isinstance(value, dict) else value
    if not isinstance(data, (bytes, bytearray)) or not data:
        raise BenchmarkDataError(f"{where}: the image cell holds no encoded image")
    return bytes(data)


def image_file(root: Path, name: str, where: str) -> Path:
    """`root / name`, which must exist: a missing image fails before any decoding starts."""
    path = root / name
    if not path.is_file():
        raise BenchmarkDataError(f"{where}: image {path} not found (give the image folder with --images)")
    return path


def require(record: Any, keys: tuple[str, ...], where: str) -> None:
    """`record` is an object with every one of `keys`."""
    if not isinstance(record, dict):
        raise BenchmarkDataError(f"{where}: expected an object with {', '.join(keys)}, got {_kind(record)}")
    missing = [k for k in keys if k not in record]
    if missing:
        raise BenchmarkDataError(f"{where}: no field(s) {', '.join(missing)}; found {', '.join(map(str, record))}")


def text(record: dict[str, Any], key: str, where: str) -> str:
    """`record[key]`, which must be a string (a question, an image name)."""
    value = record[key]
    if not isinstance(value, str):
        raise BenchmarkDataError(f"{where}: {key} must be text, got {_kind(value)}")
    return value


def answer_text(record: dict[str, Any], key: str, where: str) -> str:
    """`record[key]` as text: a string, or a JSON number written as one (a label such as 2019)."""
    value = record[key]
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise BenchmarkDataError(f"{where}: {key} must be text, got {_kind(value)}")
    return str(value)


def answer_texts(record: dict[str, Any], key: str, where: str) -> list[str]:
    """`record[key]`, which must be a non-empty list of strings (the accepted answers)."""
    value = record[key]
    if not isinstance(value, (list, tuple)) or not value or not all(isinstance(v, str) for v in value):
        raise BenchmarkDataError(f"{where}: {key} must be a non-empty list of strings, got {_kind(value)}")
    return list(value)


def _kind(value: Any) -> str:
    """A short description of a JSON value for error messages: "null", "an int (7)", "a list"."""
    if value is None:
        return "null"
    shown = f" ({value!r})" if isinstance(value, (int, float, str)) and len(repr(value)) <= 40 else ""
    name = type(value).__name__
    return f"{'an' if name[0] in 'aeiou' else 'a'} {name}{shown}"
