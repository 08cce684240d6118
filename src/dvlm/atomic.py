"""Directories that appear whole or not at all: checkpoints, final models, converted models.

A directory is assembled under a hidden temporary name beside its final place and renamed into
place only once complete. Replacing an existing directory moves the old one aside first, so at
every instant a complete directory exists under the final name or the aside name; `recover`
puts an aside directory back when a process was killed between the two renames, and removes the
temporary directories that killed processes left behind.

    with atomic_directory(out) as tmp:
        save_everything_into(tmp)
    # out is now complete; on an exception nothing changed and tmp is gone
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from safetensors import SafetensorError

# How a failed write surfaces: OSError from Python and HF, RuntimeError from torch.save ("unexpected
# pos ..." on a full disk), SafetensorError from safetensors ("I/O error: ...").
WRITE_FAILURES = (OSError, RuntimeError, SafetensorError)


class WriteError(OSError):
    """A directory could not be written (full disk, read-only folder, ...); names it and why."""


# `converting` is the temporary name dvlm convert used before it wrote through this module.
_TEMP = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old|converting)-(?P<pid>\d+)$")


def temp_path(final: Path, kind: str = "tmp") -> Path:
    """`.<name>.<kind>-<pid>` beside `final` (same filesystem, so renames are atomic)."""
    return final.parent / f".{final.name}.{kind}-{os.getpid()}"


@contextmanager
def atomic_directory(final: str | Path) -> Iterator[Path]:
    """Yield an empty temporary directory; on success it replaces `final`, on failure it is removed."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    recover(final)
    tmp = temp_path(final)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        replace_directory(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def written_whole(final: str | Path) -> Iterator[Path]:
    """`atomic_directory(final)` for a block that only writes: any failure to write (however torch or
    safetensors report it) is raised as one WriteError naming `final`, with the disk's free space."""
    final = Path(final)
    try:
        with atomic_directory(final) as tmp:
            yield tmp
    except WRITE_FAILURES as err:
        reason = err.strerror if isinstance(err, OSError) and err.strerror else first_line(err)
        error = WriteError(f"cannot write {final}: {reason}{_free_space(final.parent)}")
        error.errno = getattr(err, "errno", None)  # ENOSPC, EACCES, ... for callers that sort by cause
        raise error from err


def first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _free_space(folder: Path) -> str:
    """" (N GiB free on that disk)": what turns torch's "unexpected pos" into "the disk is full"."""
    try:
        return f" ({shutil.disk_usage(folder).free / 2**30:.1f} GiB free on that disk)"
    except OSError:
        return ""


def replace_directory(src: Path, final: Path) -> None:
    """Rename `src` to `final`, replacing an existing `final` without a moment with neither."""
    aside = temp_path(final, "old")
    if final.exists():
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(final, aside)
    os.replace(src, final)
    shutil.rmtree(aside, ignore_errors=True)


def recover(final: str | Path) -> list[str]:
    """Finish what a killed writer of `final` left: restore an aside copy if `final` is missing,
    delete dead processes' temporary and aside directories. Returns what was done, one line each."""
    final = Path(final)
    done: list[str] = []
    if not final.parent.is_dir():
        return done
    for path in sorted(final.parent.iterdir()):
        match = _TEMP.match(path.name)
        if not match or match["name"] != final.name or _alive(int(match["pid"])):
            continue
        if match["kind"] == "old" and not final.exists():
            os.replace(path, final)
            done.append(f"restored {final} from {path.name} (a replacement was interrupted)")
        else:
            shutil.rmtree(path, ignore_errors=True)
            done.append(f"removed {path.name}, left by an interrupted write of {final.name}")
    return done


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # our own leftovers from an earlier attempt in this process
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
