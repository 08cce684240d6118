"""The one dtype rule (`runtime.pick_dtype`): a CPU computes in bfloat16 only where it has bfloat16
matrix instructions, never in float16; CUDA keeps the checkpoint's dtype. Both kinds of CPU are faked."""

from __future__ import annotations

import pytest
import torch

import dvlm
from dvlm import runtime
from dvlm.model.adapters.registry import reference_adapter
from dvlm.runtime import cpu_has_fast_bf16, pick_dtype, storage_dtype
from dvlm.zoo.tiny import build_random_checkpoint
from dvlm.zoo.tokenizer import build_tokenizer

# /proc/cpuinfo "flags" lines (abridged to the relevant neighbours) of real CPU generations.
HASWELL = "flags\t\t: fpu vme de pse tsc msr sse sse2 ssse3 fma cx16 sse4_1 sse4_2 avx f16c avx2 bmi1 bmi2"
SKYLAKE_X = HASWELL + " avx512f avx512dq avx512cd avx512bw avx512vl"
COOPER_LAKE = SKYLAKE_X + " avx512_vnni avx512_bf16"
SAPPHIRE_RAPIDS = COOPER_LAKE + " avx512_fp16 amx_bf16 amx_tile amx_int8"
GRAVITON = "processor\t: 0\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp bf16"
CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.mark.parametrize("cpuinfo,fast", [
    (HASWELL, False), (SKYLAKE_X, False), (COOPER_LAKE, True), (SAPPHIRE_RAPIDS, True),
    ("processor\t: 0\n" + HASWELL + "\n\nprocessor\t: 1\n" + HASWELL, False),
    (GRAVITON, False),  # no x86 flags line: not one of the CPUs the rule knows to be fast
])
def test_fast_bf16_is_read_from_the_cpu_flags(cpuinfo, fast):
    assert cpu_has_fast_bf16(cpuinfo) is fast


def test_without_cpuinfo_torch_is_asked(monkeypatch):
    monkeypatch.setattr(runtime, "_read_cpuinfo", lambda: None)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    assert cpu_has_fast_bf16() is True
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert cpu_has_fast_bf16() is False


def fake_cpu(monkeypatch, fast: bool) -> None:
    monkeypatch.setattr(runtime, "cpu_has_fast_bf16", lambda: fast)


@pytest.mark.parametrize("saved,slow_cpu,fast_cpu,cuda", [
    ("bfloat16", torch.float32, torch.bfloat16, torch.bfloat16),
    ("float16", torch.float32, torch.float32, torch.float16),
    ("float32", torch.float32, torch.float32, torch.float32),
    (None, torch.float32, torch.float32, torch.bfloat16),  # a checkpoint that does not say
])
def test_auto_follows_the_saved_dtype_as_far_as_the_device_is_fast_in_it(monkeypatch, saved, slow_cpu, fast_cpu,
                                                                         cuda):
    fake_cpu(monkeypatch, False)
    assert pick_dtype("auto", CPU, saved) == pick_dtype(None, CPU, saved) == slow_cpu
    assert pick_dtype("auto", CUDA, saved) == cuda  # CUDA keeps the stored dtype, whatever the CPU
    fake_cpu(monkeypatch, True)
    assert pick_dtype("auto", CPU, saved) == fast_cpu
    assert pick_dtype("auto", CUDA, saved) == cuda


@pytest.mark.parametrize("fast", [False, True])
def test_an_explicit_dtype_is_obeyed(monkeypatch, fast):
    fake_cpu(monkeypatch, fast)
    for name in ("float32", "bfloat16", "float16"):
        assert pick_dtype(name, CPU, "bfloat16") == getattr(torch, name)
    with pytest.raises(ValueError, match="dtype 'float64' is not one of auto, float32, bfloat16, float16"):
        pick_dtype("float64", CPU)


def test_writing_keeps_the_stored_dtype():
    assert storage_dtype("auto", "bfloat16") == storage_dtype(None, "bfloat16") == "bfloat16"
    assert storage_dtype("auto", None) == "float32"
    assert storage_dtype("float16", "bfloat16") == "float16"
    with pytest.raises(ValueError, match="float64"):
        storage_dtype("float64", "bfloat16")


@pytest.fixture(scope="module")
def half_checkpoints(tmp_path_factory):
    """One tiny checkpoint saved in bfloat16 and in float16."""
    tokenizer = build_tokenizer(adapter=reference_adapter())
    root = tmp_path_factory.mktemp("half")
    fp32 = build_random_checkpoint(root / "fp32", tokenizer)
    lm = dvlm.load(fp32)
    paths = {}
    for name in ("bfloat16", "float16"):
        paths[name] = root / name
        lm.model.to(getattr(torch, name)).save_pretrained(paths[name])
        lm.processor.save_pretrained(paths[name])
    return paths


@pytest.mark.parametrize("fast,bf16_runs_in", [(False, torch.float32), (True, torch.bfloat16)])
def test_load_and_generate_follow_the_rule(monkeypatch, half_checkpoints, image, fast, bf16_runs_in):
    fake_cpu(monkeypatch, fast)
    bf16 = dvlm.load(half_checkpoints["bfloat16"], device="cpu")
    assert bf16.model.dtype == bf16_runs_in
    fp16 = dvlm.load(half_checkpoints["float16"], device="cpu")
    assert fp16.model.dtype == torch.float32
    explicit = dvlm.load(half_checkpoints["float16"], device="cpu", dtype="float32")
    answers = [lm.generate("Describe the image.", [image], decoder="ar", max_new_tokens=12) for lm in (fp16, explicit)]
    assert answers[0].tokens == answers[1].tokens and answers[0].num_tokens > 0
    assert dvlm.load(half_checkpoints["bfloat16"], device="cpu", dtype="bfloat16").model.dtype == torch.bfloat16


@pytest.mark.parametrize("fast", [False, True])
def test_training_in_bfloat16_on_a_slow_cpu_says_so(monkeypatch, tmp_path, capsys, half_checkpoints, fast):
    """Training keeps float32 master weights; bfloat16 autocast is asked for explicitly, and a CPU
    without bfloat16 instructions is named as the slow place for it."""
    from dvlm.config import TrainConfig
    from dvlm.tasks.builtin import export_llava, get_task
    from dvlm.train.loop import train

    fake_cpu(monkeypatch, fast)
    data = export_llava(get_task("shapes-qa").generate("train", 2, seed=0), tmp_path / "data")
    cfg = TrainConfig(max_steps=1, batch_size=2, objective="autoregressive", dtype="bfloat16")
    result = train(half_checkpoints["bfloat16"], data, tmp_path / "run", cfg, device="cpu")
    warned = "dtype: this CPU has no bfloat16 instructions (AVX512-BF16 or AMX): bfloat16 autocast runs slower " \
             "than float32 here (--dtype float32)"
    assert (warned in capsys.readouterr().out) is not fast
    assert dvlm.load(result.model_dir, dtype="bfloat16").model.dtype == torch.bfloat16  # written as stored
