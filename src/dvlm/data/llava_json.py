"""LLaVA-format training data (a JSON list or JSONL of conversations) as a torch Dataset.

One record::

    {"id": "0001", "image": "a.png" | ["a.png", "b.png"] | absent,
     "conversations": [{"from": "human", "value": "<image>\\nWhat is this?"},
                       {"from": "gpt", "value": "A cat."}]}

Images are resolved against ``image_root`` (default: the data file's folder). A record with
images but no ``<image>`` placeholder gets them before its first human text, as in LLaVA.
A bad record (malformed, an image that will not load, too long, no answer to train on) raises
:class:`SampleError`; a training loop may skip it and note it in a :class:`SkipReport`. A file
without any record is an error of the file itself.
"""

from __future__ import annotations

import hashlib
import json
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from dvlm.data.chat import IMAGE_PLACEHOLDER, SPEAKER_ROLES
from dvlm.data.images import ImageError
from dvlm.data.processor import (
    ChatProcessor,
    Encoded,
    PromptTooLongError,
    response_mask,
)


class SampleError(ValueError):
    """One record cannot be used; carries its index, its id (if any) and the reason."""

    def __init__(self, index: int, sample_id: Any, reason: str):
        name = f"sample {index}" + (f" (id={sample_id!r})" if sample_id is not None else "")
        super().__init__(f"{name}: {reason}")
        self.index = index
        self.sample_id = sample_id
        self.reason = reason


@dataclass
class SkipReport:
    """Counts skipped samples and keeps the first ``max_examples`` (id or index, reason)."""

    max_examples: int = 5
    count: int = 0
    examples: list[tuple[Any, str]] = field(default_factory=list)

    def record(self, error: SampleError) -> None:
        self.count += 1
        if len(self.examples) < self.max_examples:
            key = error.sample_id if error.sample_id is not None else f"#{error.index}"
            self.examples.append((key, error.reason))

    def summary(self) -> str:
        """One line per example, e.g. ``skipped 2 sample(s); first: 'a7': cannot load ...``."""
        if self.count == 0:
            return "skipped 0 samples"
        lines = [f"skipped {self.count} sample(s); first {len(self.examples)}:"]
        lines += [f"  {key!r}: {reason}" for key, reason in self.examples]
        return "\n".join(lines)


def read_records(path: str | Path) -> list[dict]:
    """Records of a JSON list or a JSONL file; errors name the file (and line for JSONL).

    Raises:
        FileNotFoundError: no such file. ValueError: not JSON/JSONL objects, or no record at all.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not UTF-8 text: {err}") from err
    if not text.strip():
        records = []
    elif path.suffix == ".jsonl":
        records = _read_jsonl(path, text)
    else:
        try:
            records = json.loads(text)
        except json.JSONDecodeError as whole_error:
            # Several objects one per line in a *.json file: JSONL under another name.
            if not text.lstrip().startswith("{"):
                raise ValueError(f"invalid JSON in {path}: {whole_error}") from whole_error
            records = _read_jsonl(path, text)
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise ValueError(f"{path}: expected a JSON list of objects "
                         "(or JSONL, one object a line, in a *.jsonl file)")
    if not records:
        raise ValueError(f"{path}: no records (the file holds no training sample)")
    return records


class JsonlRecords(Sequence):
    """The records of a JSONL file, parsed one at a time when asked for.

    The file is scanned once for where each non-blank line starts (16 bytes a record: a 1M-record
    file costs 16 MB, not its records); a line that is not a JSON object raises ValueError naming
    it when it is read, which the dataset turns into a skipped sample.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"data file not found: {self.path}")
        self._starts, self._lines = array("q"), array("q")
        with self.path.open("rb") as f:
            position = 0
            for number, line in enumerate(f, start=1):
                if line.strip():
                    self._starts.append(position)
                    self._lines.append(number)
                position += len(line)
        if not self._starts:
            raise ValueError(f"{self.path}: no records (the file holds no training sample)")

    def __len__(self) -> int:
        return len(self._starts)

    def __getitem__(self, index: int) -> dict:
        if not -len(self) <= index < len(self):
            raise IndexError(f"record {index} of {len(self)}")
        with self.path.open("rb") as f:  # opened per read: safe in forked DataLoader workers
            f.seek(self._starts[index])
            line = f.readline()
        where = f"{self.path} line {self._lines[index]}"
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"invalid JSON in {where}: {err}") from err
        if not isinstance(record, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
        return record


def open_records(path: str | Path) -> Sequence[dict]:
    """The records of a data file: a *.jsonl file read lazily (`JsonlRecords`), a JSON list whole."""
    if Path(path).suffix == ".jsonl":
        return JsonlRecords(path)
    return read_records(path)


def file_fingerprint(path: str | Path) -> dict[str, Any]:
    """Size and sha256 of a file's bytes: equal fingerprints mean the same records in the same order."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return {"size": Path(path).stat().st_size, "sha256": digest.hexdigest()}


def _read_jsonl(path: Path, text: str) -> list[Any]:
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"invalid JSON in {path} line {number}: {err}") from err
    return records


IMAGE_CHARACTERS = 1024  # what an image counts for in record_length: ~256 tokens of ~4 characters


def record_length(record: dict) -> int:
    """A cheap stand-in for a record's token count, to group samples by length: the characters of
    its turns plus IMAGE_CHARACTERS per image (no image opened, nothing tokenized); 0 when the
    record is malformed (it is skipped when drawn)."""
    turns, images = record.get("conversations"), record.get("image", [])
    if not isinstance(turns, list):
        return 0
    text = sum(len(t["value"]) for t in turns if isinstance(t, dict) and isinstance(t.get("value"), str))
    return text + IMAGE_CHARACTERS * (1 if isinstance(images, str) else len(images) if isinstance(images, list) else 0)


def record_to_messages(record: dict, image_root: Path) -> tuple[list[dict], list[Path]]:
    """OpenAI-style messages (with ``<image>`` placeholders) and resolved image paths.

    Raises:
        ValueError: malformed record (the reason is the message).
    """
    images = record.get("image", [])
    images = [images] if isinstance(images, str) else images
    if not isinstance(images, list) or not all(isinstance(i, str) for i in images):
        raise ValueError(f"'image' must be a path or a list of paths, got {images!r}")
    turns = record.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise ValueError("missing or empty 'conversations' list")
    messages = []
    for k, turn in enumerate(turns):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise ValueError(f"conversation turn {k} must be an object with a string 'value'")
        role = SPEAKER_ROLES.get(turn.get("from"))
        if role is None:
            raise ValueError(f"conversation turn {k}: unknown speaker {turn.get('from')!r} "
                             f"(expected one of {sorted(SPEAKER_ROLES)})")
        messages.append({"role": role, "content": turn["value"]})
    placeholders = sum(m["content"].count(IMAGE_PLACEHOLDER) for m in messages)
    if images and placeholders == 0:
        first_user = next((m for m in messages if m["role"] == "user"), None)
        if first_user is None:
            raise ValueError("record has images but no human turn to put them in")
        first_user["content"] = f"{IMAGE_PLACEHOLDER}\n" * len(images) + first_user["content"]
    return messages, [image_root / name for name in images]


class LlavaJsonDataset(Dataset):
    """LLaVA JSON/JSONL records encoded by a :class:`ChatProcessor`; items are Encoded."""

    def __init__(self, path: str | Path, processor: ChatProcessor,
                 image_root: str | Path | None = None, records: Sequence[dict] | None = None):
        """``records``: those of ``path`` when already read (a caller checking the data before
        loading a model, or `open_records`' lazy JSONL); by default they are read here."""
        self.path = Path(path)
        self.records = open_records(self.path) if records is None else records
        self.processor = processor
        self.image_root = Path(image_root) if image_root is not None else self.path.parent

    def __len__(self) -> int:
        return len(self.records)

    def sample_id(self, index: int) -> Any:
        return self.records[index].get("id")

    def __getitem__(self, index: int) -> Encoded:
        """Encode record ``index``; any problem with it is raised as :class:`SampleError`."""
        try:
            record = self.records[index]
        except ValueError as err:  # a lazily read JSONL line that is not a JSON object
            raise SampleError(index, None, str(err)) from err
        try:
            messages, images = record_to_messages(record, self.image_root)
            encoded = self.processor.encode(messages, images=images)
        except (ImageError, PromptTooLongError, ValueError) as err:
            raise SampleError(index, record.get("id"), str(err)) from err
        if not bool(response_mask(encoded.labels).any()):
            # Only answers are trained: without one the sample adds nothing but a 0/0 to the loss.
            raise SampleError(index, record.get("id"), "nothing to train on: no assistant answer")
        return encoded
