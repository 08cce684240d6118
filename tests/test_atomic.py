"""Atomic directory writes: whole or nothing, and recovery from a killed writer."""

import os
import subprocess
import sys

import pytest

from dvlm.atomic import atomic_directory, recover


def test_success_replaces_the_old_directory(tmp_path):
    final = tmp_path / "model"
    final.mkdir()
    (final / "old.txt").write_text("old")
    with atomic_directory(final) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".model.tmp-")
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in final.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_failure_leaves_the_old_directory_and_no_temp(tmp_path):
    final = tmp_path / "model"
    final.mkdir()
    (final / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_directory(final) as tmp:
            (tmp / "half.txt").write_text("half")
            raise RuntimeError("disk full")
    assert (final / "old.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(proc.stdout)


def test_recover_restores_an_aside_copy_and_removes_dead_temps(tmp_path):
    pid = dead_pid()
    aside = tmp_path / f".model.old-{pid}"
    aside.mkdir()
    (aside / "weights").write_text("complete")
    (tmp_path / f".model.tmp-{pid}").mkdir()
    (tmp_path / f".other.tmp-{pid}").mkdir()  # another directory's: not ours to touch
    live = tmp_path / f".model.tmp-{os.getppid()}"  # a live writer's: kept
    live.mkdir()
    done = recover(tmp_path / "model")
    assert len(done) == 2
    assert (tmp_path / "model" / "weights").read_text() == "complete"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["model", f".other.tmp-{pid}", live.name])
