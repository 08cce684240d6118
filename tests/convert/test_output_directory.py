"""The output appears whole or not at all (D10): a killed conversion's model-sized temporary folder
is removed by the next run, and `--overwrite` never leaves a moment with neither model."""

from __future__ import annotations

import os

import pytest

import dvlm
from dvlm.convert import conversion as convert_module
from dvlm.convert.conversion import ConversionError, convert_checkpoint
from tests.convert.sources import dead_pid, quiet


class Killed(BaseException):
    """Stands for SIGKILL: nothing after it runs, no `except Exception` catches it."""


def files_of(path):
    return {p.relative_to(path): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture
def old_model(tmp_path, ar_checkpoint):
    """An existing converted model at tmp_path/out (block size 4, so a replacement is told apart)."""
    out = tmp_path / "out"
    convert_checkpoint(ar_checkpoint, out, block_size=4, log=quiet)
    return out


def test_dead_processes_leftovers_are_removed_and_logged(tmp_path, ar_checkpoint):
    pid = dead_pid()
    stale = [tmp_path / f".out.tmp-{pid}", tmp_path / f".out.old-{pid}", tmp_path / f".out.converting-{pid}"]
    for folder in stale:  # .converting-PID: the name earlier dvlm versions used
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"\0" * 1024)
    live = tmp_path / f".out.tmp-{os.getppid()}"  # a running writer's: not ours to remove
    live.mkdir()
    other = tmp_path / f".elsewhere.tmp-{pid}"  # another output's: not ours either
    other.mkdir()
    lines = []
    convert_checkpoint(ar_checkpoint, tmp_path / "out", overwrite=True, log=lines.append)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out", live.name, other.name])
    assert dvlm.load(tmp_path / "out").diffusion is not None  # the restored .old copy was replaced
    for folder in stale:
        assert any(folder.name in line and "interrupted" in line for line in lines), (folder.name, lines)


def test_interrupted_replacement_keeps_the_old_model_for_the_next_run(tmp_path, monkeypatch, ar_checkpoint, old_model):
    before = files_of(old_model)
    real_replace = os.replace

    def killed_on_final_rename(src, dst):
        if os.fspath(dst) == os.fspath(old_model):
            raise Killed
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", killed_on_final_rename)
    with pytest.raises(Killed):
        convert_checkpoint(ar_checkpoint, old_model, overwrite=True, log=quiet)
    monkeypatch.setattr(os, "replace", real_replace)
    lines = []
    with pytest.raises(FileExistsError, match="--overwrite"):  # the next run restores the old model first
        convert_checkpoint(ar_checkpoint, old_model, log=lines.append)
    assert any(line.startswith(f"restored {old_model}") for line in lines), lines
    assert files_of(old_model) == before
    assert dvlm.load(old_model).diffusion.block_size == 4
    assert sorted(p.name for p in old_model.parent.iterdir()) == ["out"]


def test_failed_verification_leaves_the_old_model_intact(tmp_path, monkeypatch, ar_checkpoint, old_model):
    before = files_of(old_model)
    monkeypatch.setattr(convert_module, "max_logit_difference", lambda *args: 1.0)
    with pytest.raises(ConversionError, match="differs from the source"):
        convert_checkpoint(ar_checkpoint, old_model, overwrite=True, log=quiet)
    assert files_of(old_model) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_overwrite_replaces_the_old_model(tmp_path, ar_checkpoint, old_model):
    convert_checkpoint(ar_checkpoint, old_model, block_size=8, overwrite=True, log=quiet)
    assert dvlm.load(old_model).diffusion.block_size == 8
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
