"""The `dvlm` command line. The CLI is a dict of verbs: each verb is one function taking the
parsed arguments, plus one function declaring those arguments; `VERBS` maps names to both.

    dvlm assemble --lm ./my-causal-lm --vision ./my-vision-tower --out my-ar-vlm
    dvlm convert  --model ./my-ar-vlm --out my-dvlm
    dvlm train    --model my-dvlm --data train.json --out runs/r1 --steps 1000
    dvlm generate --model runs/r1/model --image cat.png --prompt "What is in the picture?"
    dvlm eval     --task shapes-caption --model tiny-dvlm --decoder spec
    dvlm bench    --decoders ar,hf,block,spec --block-sizes 8,16 --thresholds 0.7,0.9
    dvlm serve    --model runs/r1/model --port 8000
    dvlm chat     --model runs/r1/model --image cat.png
    dvlm quantize --model runs/r1/model --out r1-int8 --scheme int8-dynamic
    dvlm demo
    dvlm ablate   --only full,no-anneal --seeds 2 --steps 500

Adding a verb = two functions and one `VERBS` entry. Expected failures (bad paths, bad settings,
unreadable images, ...) print one line `dvlm <verb>: error: <message>` and exit with 2.
"""

from __future__ import annotations

import argparse
import errno
import json
import math
import os
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, NoReturn

import dvlm
from dvlm.atomic import WriteError
from dvlm.config import (
    DECODERS,
    DEFAULT_THRESHOLD,
    DTYPES,
    PRESETS,
    TRAINABLE,
    ConfigError,
    TrainConfig,
    from_dict,
    load_yaml,
    parse_overrides,
)
from dvlm.convert.conversion import ConversionError, convert_checkpoint
from dvlm.data.images import ImageError, load_image
from dvlm.data.processor import PromptTooLongError
from dvlm.model.adapters.registry import UnsupportedArchitectureError
from dvlm.runtime import pick_device
from dvlm.tasks.benchmarks.items import RULE_NAMES

DEFAULT_MODEL = "tiny-dvlm"  # the built-in model `generate` uses when it is installed
TASK_LIMIT = 100  # samples `dvlm eval --task` draws unless --limit says otherwise
# `dvlm eval` options that only a model run reads (refused beside --predictions).
MODEL_OPTIONS = ("model", "decoder", "decoders", "device", "block_size", "threshold", "steps", "max_new_tokens")
DTYPE_HELP = ("compute dtype (default: auto = the checkpoint's own dtype on CUDA; on a CPU, bfloat16 only where "
              "the CPU has AVX512-BF16 or AMX, float32 otherwise and for float16 checkpoints)")


class CLIError(Exception):
    """A usage problem the CLI itself detects (printed as one line, exit status 2)."""


def real(text: str) -> float:
    """The argparse type of every real-valued option: a finite number (inf and nan are refused)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


# Errors a user can cause and fix; anything else is a bug and keeps its traceback.
EXPECTED_ERRORS = (
    CLIError, FileNotFoundError, NotADirectoryError, FileExistsError, UnsupportedArchitectureError,
    ConfigError, ConversionError, ImageError, PromptTooLongError, ValueError, WriteError,
)


# -- convert -------------------------------------------------------------------------------------
def convert_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, metavar="SRC",
                   help="the autoregressive source: a checkpoint directory (safetensors) or a built-in model's name")
    p.add_argument("--out", required=True, metavar="DST", help="directory to write the converted dVLM to")
    p.add_argument("--preset", default="fast-dvlm", choices=sorted(PRESETS),
                   help="diffusion recipe defaults (default: %(default)s)")
    p.add_argument("--block-size", type=int, metavar="N", help="diffusion block size (default: the preset's)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", dest="overrides",
                   help="override a DiffusionConfig field, e.g. --set decode_threshold=0.8 (repeatable)")
    p.add_argument("--overwrite", action="store_true", help="replace DST if it exists and is not empty")
    p.add_argument("--device", help="device for loading and verification, e.g. cpu, cuda:0 (default: auto)")
    p.add_argument("--dtype", default="auto", choices=DTYPES,
                   help="dtype to write the model in (default: auto = the source's, from its config.json); the check "
                   "computes in it, or in float32 on a CPU slow in it (float16; bfloat16 without AVX512-BF16 or AMX)")


def convert(args: argparse.Namespace) -> None:
    """Convert an AR checkpoint into a block-diffusion one and verify it."""
    with quiet_hf_progress():  # stderr holds only the one-line error, if any; the log says what happens
        report = convert_checkpoint(
            model_path(args.model), args.out, preset=args.preset, block_size=args.block_size,
            overrides=parse_overrides(args.overrides), overwrite=args.overwrite,
            device=checked_device(args.device), dtype=args.dtype, log=lambda line: print(line, flush=True),
        )
    print(f"converted {report.source} -> {report.output}")
    print(f"  architecture   {report.architecture} ({report.parameters:,} parameters)")
    print(f"  weights        {report.dtype}, {report.shards} file{'s' if report.shards > 1 else ''}")
    print(f"  preset         {report.preset}, block_size {report.block_size}")
    print(f"  mask token     {report.mask_token!r} = id {report.mask_token_id} ({report.mask_row_description})")
    print(f"  max logit diff {report.max_logit_difference:.2e} (tolerance {report.tolerance:g}, computed in "
          f"{report.verified_in}): verified")


# -- assemble ------------------------------------------------------------------------------------
def assemble_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--lm", required=True, metavar="DIR",
                   help="local causal language model checkpoint (safetensors, with its tokenizer)")
    p.add_argument("--vision", required=True, metavar="DIR",
                   help="local vision tower checkpoint (safetensors; its preprocessor_config.json is read if present)")
    p.add_argument("--out", required=True, metavar="DST", help="directory to write the assembled AR VLM to")
    p.add_argument("--architecture",
                   help="the VLM architecture (config.json name) to assemble (default: the only one that can be)")
    p.add_argument("--seed", type=int, default=0, help="seed of the new projector's init (default: %(default)s)")
    p.add_argument("--dtype", default="auto", choices=DTYPES,
                   help="dtype to write the model in (default: auto = the language model's)")
    p.add_argument("--overwrite", action="store_true", help="replace DST if it exists and is not empty")


def assemble(args: argparse.Namespace) -> None:
    """Join a causal LM and a vision tower with a new projector into an AR VLM checkpoint."""
    from dvlm.convert.assembly import assemble_checkpoint

    with quiet_hf_progress():
        report = assemble_checkpoint(args.lm, args.vision, args.out, architecture=args.architecture, seed=args.seed,
                                     dtype=args.dtype, overwrite=args.overwrite,
                                     log=lambda line: print(line, flush=True))
    print(f"assembled {report.language_model} + {report.vision_tower} -> {report.output}")
    print(f"  architecture   {report.architecture} ({report.parameters:,} parameters, "
          f"{report.new_parameters:,} of them new)")
    print(f"  added tokens   {', '.join(report.added_tokens) or 'none'}")
    print(f"  next           dvlm train --model {report.output} --trainable projector --ar ... (align the "
          "projector), then dvlm convert")


# -- train ---------------------------------------------------------------------------------------
def train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True,
                   help="checkpoint to start from, a directory or a built-in model's name: a converted dVLM (or an "
                        "AR model with --ar)")
    p.add_argument("--data", required=True, help="LLaVA-format training data (.json list or .jsonl)")
    p.add_argument("--out", required=True, metavar="RUN", help="run directory: checkpoints, metrics, final model")
    p.add_argument("--image-root", metavar="DIR", help="folder image paths are relative to (default: the data file's)")
    p.add_argument("--config", metavar="YAML", help="TrainConfig settings from a YAML mapping")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", dest="overrides",
                   help="override a TrainConfig field, e.g. --set warmup_ratio=0.1 (repeatable; beats --config)")
    p.add_argument("--diffusion", action="append", metavar="KEY=VALUE",
                   help="override a field of the model's DiffusionConfig, e.g. --diffusion block_size=8 (repeatable)")
    p.add_argument("--resume", action="store_true",
                   help="continue RUN from its newest usable checkpoint, with the same data and batch settings "
                        "(from step 0 if RUN has no checkpoint yet)")
    p.add_argument("--steps", type=int, metavar="N", help="total optimizer steps (TrainConfig.max_steps)")
    p.add_argument("--batch-size", type=int, metavar="N", help="samples per micro-batch")
    p.add_argument("--grad-accum", type=int, metavar="N", help="micro-batches per optimizer step")
    p.add_argument("--num-workers", type=int, metavar="N",
                   help="DataLoader workers that read and encode the coming steps' samples (default: 0)")
    p.add_argument("--group-by-length", action="store_true", default=None,
                   help="put samples of similar length in the same steps (less padding)")
    p.add_argument("--report-to", choices=("tensorboard",),
                   help="also log loss parts, lr, tokens/s and block size to TensorBoard (RUN/tensorboard)")
    p.add_argument("--lr", type=real, metavar="F", help="peak learning rate")
    p.add_argument("--dtype", choices=("float32", "bfloat16"),
                   help="compute dtype (default: float32; bfloat16: autocast, master weights stay float32; on a CPU "
                        "without AVX512-BF16 or AMX bfloat16 runs slower than float32)")
    p.add_argument("--save-dtype", default="auto", choices=DTYPES,
                   help="dtype of the final model (default: auto = the --model checkpoint's; checkpoints for "
                        "--resume stay float32)")
    p.add_argument("--gradient-checkpointing", action="store_true", default=None,
                   help="recompute activations in the backward pass to save memory")
    p.add_argument("--ar", action="store_const", const="autoregressive", default=None,
                   help="pure autoregressive training (next-token loss, no diffusion): objective=autoregressive")
    p.add_argument("--lora", nargs="?", const="default", metavar="SPEC",
                   help="LoRA instead of a full fine-tune, e.g. r=16,alpha=32,dropout=0.05,targets=q_proj+v_proj "
                        "(bare --lora: r=16, alpha=32, every language-model linear layer); the mask token's "
                        "rows train too and the final model has the updates merged in")
    p.add_argument("--trainable", choices=TRAINABLE,
                   help="what trains: all (default) or projector (vision encoder and language model frozen: "
                        "aligning a model made by `dvlm assemble`, with --ar)")
    p.add_argument("--device", help="training device, e.g. cpu, cuda:0 (default: auto)")
    p.add_argument("--num-processes", type=int, metavar="N",
                   help="data parallel over N processes (DDP), through `accelerate launch --multi_gpu`; for "
                        "FSDP2, DeepSpeed or several nodes run `accelerate launch --config_file ... -m dvlm train`")


# Explicit flags -> TrainConfig fields; they beat --set, which beats --config.
TRAIN_FLAGS = {"steps": "max_steps", "batch_size": "batch_size", "grad_accum": "grad_accum", "lr": "learning_rate",
               "dtype": "dtype", "gradient_checkpointing": "gradient_checkpointing", "ar": "objective",
               "lora": "lora", "num_workers": "num_workers", "group_by_length": "group_by_length",
               "report_to": "report_to", "trainable": "trainable"}


def train_config(args: argparse.Namespace) -> TrainConfig:
    values: dict[str, Any] = load_yaml(args.config) if args.config else {}
    values.update(parse_overrides(args.overrides))
    flags = {field: getattr(args, flag) for flag, field in TRAIN_FLAGS.items()}
    values.update({field: value for field, value in flags.items() if value is not None})
    return from_dict(TrainConfig, values)


def train(args: argparse.Namespace) -> None:
    """Fine-tune a model; prints where the model and metrics went."""
    from dvlm.train.loop import METRICS_FILE
    from dvlm.train.loop import train as run_training

    cfg = train_config(args)
    model = model_path(args.model)  # a bad name is refused before any process starts
    if args.num_processes is not None and args.num_processes > 1 and "WORLD_SIZE" not in os.environ:
        raise SystemExit(_launch_processes(args.num_processes, args.argv))
    run_dir = Path(args.out)
    created = not run_dir.exists()
    try:
        with quiet_hf_progress():  # the training bar is the progress shown; HF's loading bars are noise
            result = run_training(
                model, args.data, run_dir, cfg, image_root=args.image_root,
                diffusion_overrides=parse_overrides(args.diffusion) or None, resume=args.resume,
                device=checked_device(args.device), save_dtype=args.save_dtype,
            )
    except BaseException:
        if created and run_dir.is_dir() and not any(run_dir.iterdir()):
            run_dir.rmdir()  # a run that failed before writing anything leaves no folder behind
        raise
    if not result.main_process:
        return  # rank 0 reports
    resumed = f" (resumed at step {result.start_step})" if result.start_step else ""
    print(f"trained {result.steps} steps{resumed}" + (f", final loss {result.losses[-1]:.4f}" if result.losses else ""))
    print(f"  model    {result.model_dir}")
    print(f"  metrics  {result.run_dir / METRICS_FILE}")
    print(f"  skipped  {result.skipped} sample(s)" + (" (listed above)" if result.skipped else ""))


def _launch_processes(count: int, argv: list[str]) -> int:
    """Run this `dvlm train` command again in `count` processes under accelerate's launcher
    (torchrun: a rank that dies ends the others); returns the launcher's exit status."""
    import socket
    import subprocess

    with socket.socket() as probe:  # a free port for the processes to meet on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(count),
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                "--main_process_port", str(port)]
    return subprocess.run([*launcher, "-m", "dvlm", *_without_option(argv, "--num-processes")]).returncode


def _without_option(argv: list[str], option: str) -> list[str]:
    """argv without `option VALUE` / `option=VALUE`."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == option:
            skip = True
        elif not arg.startswith(option + "="):
            kept.append(arg)
    return kept


# -- generate ------------------------------------------------------------------------------------
def generate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help=f"checkpoint directory or built-in name (default: {DEFAULT_MODEL}, once installed)")
    p.add_argument("--image", action="append", metavar="IMG", help="image file, in prompt order (repeatable)")
    p.add_argument("--prompt", required=True, help="the question; use <image> to place images inside the text")
    p.add_argument("--decoder", choices=DECODERS,
                   help="block (diffusion), spec (self-speculative: AR's output, fewer forwards), "
                        "spec-quadratic (experimental spec, one pass per block), ar (our KV-cached loop) or "
                        "hf (transformers generate); default: block for converted models, else ar")
    add_block_arguments(p)
    p.add_argument("--sub-block-size", type=int, metavar="S",
                   help="block decoding: unmask sub-blocks of S positions left to right")
    p.add_argument("--max-new-tokens", type=int, default=128, metavar="N",
                   help="answer length limit (default: %(default)s)")
    p.add_argument("--temperature", type=real, default=0.0, metavar="T", help="0 = greedy (default: %(default)s)")
    p.add_argument("--top-k", type=int, metavar="K", help="sample from the K most likely tokens only")
    p.add_argument("--top-p", type=real, metavar="P", help="nucleus sampling probability mass")
    p.add_argument("--seed", type=int, metavar="S", help="seed of the sampling generator")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="print the full GenerationOutput as JSON")
    out.add_argument("--stream", action="store_true", help="print the answer as each block is committed")
    p.add_argument("--verbose", action="store_true", help="print decoding statistics on stderr")
    add_compile_argument(p)
    p.add_argument("--device", help="e.g. cpu, cuda:0 (default: auto)")
    p.add_argument("--dtype", choices=DTYPES, help=DTYPE_HELP)


def add_compile_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--compile", action="store_true",
                   help="run each decoding forward under torch.compile (CUDA graphs on a GPU): the same tokens, "
                        "faster after a warm-up that compiles each new shape (not counted in tokens/s)")


def generate(args: argparse.Namespace) -> None:
    """Answer one prompt; stdout holds only the answer (or the JSON output)."""
    images = [load_image(path) for path in args.image or []]  # bad images fail before the model loads
    with quiet_hf_progress():  # stderr stays empty unless --verbose
        lm = dvlm.load(model_path(args.model), device=checked_device(args.device), dtype=args.dtype)
    options = dict(decoder=args.decoder, block_size=args.block_size, threshold=args.threshold, steps=args.steps,
                   sub_block_size=args.sub_block_size, max_new_tokens=args.max_new_tokens,
                   temperature=args.temperature, top_k=args.top_k,
                   top_p=args.top_p, seed=args.seed, compile=args.compile)
    if args.stream:
        stream = lm.stream(args.prompt, images, **options)
        for piece in stream:
            print(piece, end="", flush=True)
        print()
        out = stream.output
    else:
        out = lm.generate(args.prompt, images, **options)
    if args.json:
        print(json.dumps(out.to_dict(), indent=2))
    elif not args.stream:
        print(out.text)
    if args.verbose:
        compiling = f" compile_s={out.timings['compile_s']:.1f}" if "compile_s" in out.timings else ""
        print(f"decoder={out.decoder} tokens={out.num_tokens} nfe={out.nfe} tokens/nfe={out.tokens_per_nfe:.2f} "
              f"tokens/s={out.tokens_per_second:.1f} finish={out.finish_reason}{compiling}", file=sys.stderr)


def add_block_arguments(p: argparse.ArgumentParser) -> None:
    """--block-size and the unmasking policy (--threshold or --steps), as generate, eval and chat take them."""
    p.add_argument("--block-size", type=int, metavar="N",
                   help="block size for block and spec decoding (default: the model's)")
    policy = p.add_mutually_exclusive_group()
    policy.add_argument("--threshold", type=real, metavar="T",
                        help="block decoding: unmask every position with confidence >= T")
    policy.add_argument("--steps", type=int, metavar="S", help="block decoding: fixed denoising steps per block")


def model_path(model: str | None) -> Path:
    """The checkpoint directory of --model (a directory or a built-in model's name: one rule for every
    verb, `dvlm.zoo.registry.resolve_model`), else of the default built-in model."""
    from dvlm.zoo.registry import resolve_model

    return resolve_model(model_name(model))


def model_name(model: str | None) -> str:
    """--model, else the built-in model once it is installed."""
    if model is not None:
        return model
    from dvlm.zoo.registry import builtin_names

    if DEFAULT_MODEL in builtin_names():
        return DEFAULT_MODEL
    raise CLIError(f"no --model given and the built-in model {DEFAULT_MODEL!r} is not installed; "
                   "pass --model DIR (a converted dVLM or an AR checkpoint directory)")


# -- demo ----------------------------------------------------------------------------------------
def demo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", metavar="DIR", default="dvlm-demo",
                   help="folder for results.json, the plot and the example image (default: %(default)s)")
    p.add_argument("--limit", type=int, default=20, metavar="N", help="test samples per task (default: %(default)s)")
    p.add_argument("--max-new-tokens", type=int, default=96, metavar="N",
                   help="answer length limit (default: %(default)s)")
    p.add_argument("--random", action="store_true",
                   help="use a freshly built random tiny model instead of the built-in trained ones")


def demo(args: argparse.Namespace) -> None:
    """Evaluate tiny-ar (AR) against tiny-dvlm (block, spec) on every task; or, without built-in
    weights (or with --random), build, convert and decode a random tiny model."""
    from dvlm.zoo.demo import AR_MODEL, DIFFUSION_MODEL, run_demo, run_random_demo
    from dvlm.zoo.registry import builtin_names

    if args.limit < 1:
        raise CLIError("--limit must be >= 1")
    installed = {AR_MODEL, DIFFUSION_MODEL} <= set(builtin_names())
    with quiet_hf_progress():  # HF's per-file bars would drown the demo's own lines
        if installed and not args.random:
            run_demo(writable_directory(Path(args.out)), limit=args.limit, max_new_tokens=args.max_new_tokens,
                     log=lambda line: print(line, flush=True))
            return
        if not installed:
            print("[demo] the built-in weights are not installed: running the random-model demo", flush=True)
        with tempfile.TemporaryDirectory(prefix="dvlm-demo-") as tmp:
            run_random_demo(Path(tmp), min(args.max_new_tokens, 24))


# -- eval / bench --------------------------------------------------------------------------------
def eval_arguments(p: argparse.ArgumentParser) -> None:
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--task", help="built-in task: shapes-qa, shapes-caption, digits-read, multi-turn")
    which.add_argument("--benchmark", help="published benchmark read from --data: mme, pope, ai2d, chartqa, docvqa, "
                                           "textvqa, mmmu, gqa, mmbench, realworldqa, seedbench_2_plus, "
                                           "mmmu_pro_standard, mmmu_pro_vision")
    p.add_argument("--data", metavar="PATH", help="--benchmark: its file or folder (official release or the "
                                                  "Hugging Face parquet)")
    p.add_argument("--images", metavar="DIR", help="--benchmark: the image folder, where the data names image files "
                                                   "(GQA's parquet: the testdev_balanced_images files)")
    p.add_argument("--decoders", metavar="LIST", help="--benchmark: comma-separated decoders run side by side "
                                                      "(default: --decoder, or the model's)")
    p.add_argument("--out", metavar="DIR", help="--benchmark: write JSON, a Markdown table, the plot and the "
                                                "answers here")
    p.add_argument("--rule", choices=RULE_NAMES, help="--benchmark: the scoring rule, lmms-eval's task code or the "
                                                      "benchmark's own scorer where they differ (default: lmms-eval)")
    p.add_argument("--predictions", metavar="FILE", help="--benchmark: re-score this JSON-lines file of "
                                                        '{"id", "prediction"} (ids as dvlm writes them); no model')
    p.add_argument("--model", help=f"checkpoint directory or built-in name (default: {DEFAULT_MODEL})")
    p.add_argument("--decoder", choices=DECODERS, help="default: block for converted models, else ar")
    p.add_argument("--split", default="test", choices=("train", "validation", "test"), help="(default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="sample seed; a new seed draws fresh samples (default: 0)")
    p.add_argument("--limit", type=int, metavar="N", help="samples to evaluate (default: 100 for --task; every "
                                                          "item for --benchmark)")
    p.add_argument("--batch-size", type=int, default=1, metavar="N", help="prompts decoded together (default: 1)")
    add_block_arguments(p)
    p.add_argument("--max-new-tokens", type=int, metavar="N",
                   help="(default: 96 for --task; the benchmark's lmms-eval setting for --benchmark)")
    p.add_argument("--json", action="store_true", help="print the full result as JSON")
    add_compile_argument(p)
    p.add_argument("--device", help="e.g. cpu, cuda:0 (default: auto)")


def evaluate(args: argparse.Namespace) -> None:
    """Score a model on a built-in task's split; accuracy and speed from the same run."""
    from dvlm.eval.harness import evaluate as run_eval

    if (args.limit is not None and args.limit < 1) or args.batch_size < 1:
        raise CLIError("--limit and --batch-size must be >= 1")
    if args.benchmark:
        return evaluate_benchmark(args)
    for option in ("data", "images", "decoders", "out", "rule", "predictions"):
        if getattr(args, option) is not None:
            raise CLIError(f"--{option} goes with --benchmark, not --task")
    model = model_path(args.model)
    with quiet_hf_progress():
        lm = dvlm.load(model, device=checked_device(args.device))
    options = {k: v for k, v in (("block_size", args.block_size), ("threshold", args.threshold),
                                 ("steps", args.steps)) if v is not None}
    if args.compile:
        options["compile"] = True
    limit = TASK_LIMIT if args.limit is None else args.limit
    result = run_eval(lm, args.task, split=args.split, limit=limit, seed=args.seed, decoder=args.decoder,
                      batch_size=args.batch_size, max_new_tokens=args.max_new_tokens or 96, **options)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
        return
    print(f"{args.task} ({args.split}, {result.num_samples} samples, decoder {result.decoder})")
    for name, value in result.metrics.items():
        print(f"  {name:<18}{value:.4f}")
    print(f"  {'tokens/forward':<18}{result.speed['tokens_per_nfe']:.3f}")
    print(f"  {'tokens/s':<18}{result.speed['tokens_per_second']:.1f}")


def evaluate_benchmark(args: argparse.Namespace) -> None:
    """`dvlm eval --benchmark`: the files are read (and refused) before the model loads; every item
    is scored unless --limit is given; --predictions re-scores a file instead of running a model."""
    from dvlm.eval.benchmark import match_predictions, read_predictions, rescore, run_benchmark
    from dvlm.tasks.benchmarks import get_benchmark

    if not args.data:
        raise CLIError("--benchmark needs --data (the benchmark's file or folder)")
    benchmark = get_benchmark(args.benchmark)
    rule = benchmark.check_rule(args.rule)
    every = benchmark.read(Path(args.data).expanduser(), Path(args.images).expanduser() if args.images else None)
    if not every:
        raise CLIError(f"{args.data}: no {benchmark.name} items")
    items = benchmark.select(every, args.limit)
    out = writable_directory(Path(args.out)) if args.out else None
    if args.predictions:
        used = [f"--{o.replace('_', '-')}" for o in MODEL_OPTIONS if getattr(args, o) is not None]
        used += ["--compile"] if args.compile else []
        if used:
            raise CLIError(f"--predictions re-scores a file: {', '.join(used)} would not be used")
        source = Path(args.predictions).expanduser()
        predictions = read_predictions(source)
        match_predictions(predictions, every, items, source)
        runs = [rescore(benchmark, items, predictions, rule=rule, total=len(every), source=str(source))]
        device = f"none, answers re-scored from {source.name}"
    else:
        decoders = (split_list(args.decoders, "--decoders") if args.decoders
                    else [args.decoder] if args.decoder else None)
        unknown = [d for d in decoders or [] if d not in DECODERS]
        if unknown:
            raise ConfigError(f"unknown decoder(s) {', '.join(unknown)}; choose from {', '.join(DECODERS)}")
        model = model_path(args.model)
        with quiet_hf_progress():
            lm = dvlm.load(model, device=checked_device(args.device))
        runs = run_benchmark(lm, benchmark, items, decoders or ["block" if lm.diffusion else "ar"], rule=rule,
                             total=len(every), batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                             progress=True, block_size=args.block_size, threshold=args.threshold, steps=args.steps,
                             **({"compile": True} if args.compile else {}))
        device = describe_device(lm.device)
    report_benchmark(args, benchmark, runs, device, out)


def report_benchmark(args: argparse.Namespace, benchmark: Any, runs: list[Any], device: str, out: Path | None) -> None:
    from dvlm.eval.benchmark import markdown_table, write_report

    if args.json:
        print(json.dumps([run.row for run in runs], indent=2))
    else:
        print(markdown_table(benchmark, [run.row for run in runs], device))
    if out is not None:
        paths = write_report(benchmark, runs, out, device)
        print(f"wrote {', '.join(str(p) for p in paths.values())}", file=sys.stderr)


def bench_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help=f"the dVLM to benchmark (default: {DEFAULT_MODEL})")
    p.add_argument("--baseline", help="AR model for the `hf` baseline, e.g. the conversion source "
                                      "(default: tiny-ar with the built-in model, else none)")
    p.add_argument("--task", action="append", help="task(s) to run (repeatable; default: shapes-caption, digits-read)")
    p.add_argument("--decoders", default="ar,hf,block,spec",
                   help=f"comma-separated, from {', '.join(DECODERS)} (default: %(default)s)")
    p.add_argument("--block-sizes", default="16", help="comma-separated block sizes (default: %(default)s)")
    p.add_argument("--thresholds", default=str(DEFAULT_THRESHOLD), help="comma-separated thresholds (default: %(default)s)")
    p.add_argument("--limit", type=int, default=20, metavar="N", help="samples per task (default: %(default)s)")
    p.add_argument("--max-new-tokens", type=int, default=96, metavar="N", help="(default: %(default)s)")
    p.add_argument("--out", default="bench-results", metavar="DIR", help="JSON, Markdown and plot (default: %(default)s)")
    p.add_argument("--compile", action="store_true",
                   help="also run every setting (but hf) under torch.compile, side by side with eager")
    p.add_argument("--device", help="e.g. cpu, cuda:0 (default: auto)")


def bench(args: argparse.Namespace) -> None:
    """Accuracy and speed of each decoder setting, with speed-ups measured side by side."""
    from dvlm.eval.bench import (
        ROWS_FILE,
        append_row,
        run_bench,
        settings_grid,
        write_report,
    )

    # Everything that can be refused is refused before any model loads or decodes.
    decoders = split_list(args.decoders, "--decoders")
    unknown = [d for d in decoders if d not in DECODERS]
    if unknown:
        raise ConfigError(f"unknown decoder(s) {', '.join(unknown)}; choose from {', '.join(DECODERS)}")
    block_sizes = [parse_number(b, int, "--block-sizes") for b in split_list(args.block_sizes, "--block-sizes")]
    thresholds = [parse_number(t, float, "--thresholds") for t in split_list(args.thresholds, "--thresholds")]
    if args.limit < 1:
        raise CLIError("--limit must be >= 1")
    name = model_name(args.model)
    model = model_path(name)
    baseline = args.baseline or ("tiny-ar" if name == DEFAULT_MODEL else None)
    baseline = model_path(baseline) if baseline else None
    out = writable_directory(Path(args.out))
    (out / ROWS_FILE).unlink(missing_ok=True)
    with quiet_hf_progress():
        models = {"main": dvlm.load(model, device=checked_device(args.device))}
        if baseline:
            models["baseline"] = dvlm.load(baseline, device=args.device)
    grid = settings_grid(decoders, block_sizes, thresholds, "baseline" in models, compiled=args.compile)
    rows = run_bench(models, args.task or ["shapes-caption", "digits-read"], grid, limit=args.limit,
                     max_new_tokens=args.max_new_tokens, on_row=append_row(out / ROWS_FILE))
    device = describe_device(models["main"].device)
    paths = write_report(rows, out, device)
    print(paths["markdown"].read_text())
    print(f"wrote {paths['json']}, {paths['markdown']}, {paths['plot']}")


def split_list(text: str, flag: str) -> list[str]:
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise CLIError(f"{flag} is empty; give a comma-separated list")
    return items


def parse_number(text: str, kind: type, flag: str) -> Any:
    try:
        return int(text) if kind is int else real(text)
    except (ValueError, argparse.ArgumentTypeError) as err:
        raise CLIError(f"{flag}: {text!r} is not {'an integer' if kind is int else 'a finite number'}") from err


def describe_device(device: Any) -> str:
    import platform

    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)"


# -- quantize ------------------------------------------------------------------------------------
def quantize_arguments(p: argparse.ArgumentParser) -> None:
    from dvlm.model.quantize import SCHEMES

    p.add_argument("--model", required=True, help="checkpoint directory or built-in name to quantize")
    p.add_argument("--out", required=True, metavar="DIR", help="directory to write the quantized model to")
    p.add_argument("--scheme", required=True, choices=SCHEMES,
                   help="int8-weight (weights only), int8-dynamic (W8A8) or fp8 (W8A8, CUDA compute capability "
                        ">= 8.9)")
    p.add_argument("--overwrite", action="store_true", help="replace DIR if it exists and is not empty")
    p.add_argument("--device", help="device to check the result on, e.g. cpu, cuda:0 (default: auto)")


def quantize(args: argparse.Namespace) -> None:
    """Write a model that dvlm.load quantizes with --scheme, after checking it loads and quantizes here."""
    from dvlm.model.quantize import check_can_quantize, write_quantized

    src = model_path(args.model)
    check_can_quantize(args.scheme, pick_device(checked_device(args.device)))  # before anything is written
    out = write_quantized(src, Path(args.out), args.scheme, overwrite=args.overwrite)
    with quiet_hf_progress():
        lm = dvlm.load(out, device=args.device)  # proves the result loads (and quantizes) here
    print(f"quantized {src} -> {out} ({args.scheme}; vision encoder and output layer kept in "
          f"{lm.adapter.model_dtype(lm.model)})")
    print("  the weights are stored in full precision and quantized by dvlm.load: serve or evaluate DIR as any model")


# -- zoo -----------------------------------------------------------------------------------------
def zoo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=("build", "list"), help="build: rebuild the built-in models; list: show them")
    p.add_argument("--out", metavar="DIR", help="where to write tiny-ar/ and tiny-dvlm/ (default: the package's weights)")
    p.add_argument("--work-dir", metavar="DIR",
                   help="data, runs and stage stamps (default: OUT/.zoo-build); rerunning with the same "
                        "directory skips the stages an earlier build finished")
    p.add_argument("--scale", type=real, default=1.0, help="fraction of the recipe's steps and data (default: 1)")


def zoo(args: argparse.Namespace) -> None:
    """Rebuild the built-in models from scratch with the shipped recipe, or list them."""
    from dvlm.zoo.recipe import ZooRecipe, build_zoo
    from dvlm.zoo.registry import WEIGHTS_DIR, builtin_names

    if args.action == "list":
        for name in builtin_names():
            print(f"{name}\t{WEIGHTS_DIR / name}")
        return
    if not 0 < args.scale <= 1:
        raise CLIError("--scale must be in (0, 1]")
    recipe = ZooRecipe() if args.scale == 1 else ZooRecipe().scaled(args.scale)
    paths = build_zoo(writable_directory(Path(args.out) if args.out else WEIGHTS_DIR), recipe, work_dir=args.work_dir,
                      log=lambda line: print(line, flush=True))
    for name, path in paths.items():
        print(f"built {name}: {path}")


# -- ablate --------------------------------------------------------------------------------------
def ablate_arguments(p: argparse.ArgumentParser) -> None:
    from dvlm.zoo.ablate import VARIANTS, AblationPlan

    full = AblationPlan()
    p.add_argument("--model", default="tiny-ar",
                   help="the AR model each variant converts and fine-tunes, a directory or a built-in model's name "
                        "(default: %(default)s)")
    p.add_argument("--only", metavar="NAME,...", help=f"variants to run, from {', '.join(VARIANTS)} (default: all)")
    p.add_argument("--seeds", type=int, metavar="N", help=f"fine-tunes per variant (default: {full.seeds})")
    p.add_argument("--steps", type=int, metavar="N", help=f"fine-tuning steps per run (default: {full.steps})")
    p.add_argument("--samples", type=int, metavar="N", help=f"test samples per task (default: {full.samples})")
    p.add_argument("--out", default="ablate-results", metavar="DIR",
                   help="runs, results and report; a rerun with the same DIR skips finished runs (default: %(default)s)")
    p.add_argument("--quick", action="store_true", help="the whole plumbing in minutes: tiny budgets, no science")


def ablate(args: argparse.Namespace) -> None:
    """Fine-tune tiny-ar once per recipe variant and seed, evaluate, and report the papers' claims."""
    from dataclasses import replace

    from dvlm.zoo.ablate import AblationPlan, quick_plan, run_ablation
    from dvlm.zoo.ablate_report import write_report

    only = split_list(args.only, "--only") if args.only is not None else None
    plan = quick_plan(only) if args.quick else AblationPlan(**({"variants": only} if only else {}))
    given = {k: v for k, v in (("seeds", args.seeds), ("steps", args.steps), ("samples", args.samples)) if v is not None}
    plan = replace(plan, **given)  # validated again: bad names and counts are refused before any work
    source = model_path(args.model)
    out = writable_directory(Path(args.out))
    with quiet_hf_progress():
        results = run_ablation(plan, out, log=lambda line: print(line, flush=True), source=source)
    import torch

    paths = write_report(results, out, describe_device(torch.device("cpu")))
    print(f"wrote {', '.join(str(path) for path in paths.values())}")


# -- serve / chat --------------------------------------------------------------------------------
def serve_arguments(p: argparse.ArgumentParser) -> None:
    from dvlm.serve.requests import SERVED_DECODERS

    p.add_argument("--model", help=f"checkpoint directory or built-in name (default: {DEFAULT_MODEL}); clients "
                                   "send this as their `model`")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default: %(default)s, this machine only; 0.0.0.0 for every "
                        "interface, with --api-key)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (default: %(default)s; 0: any free port)")
    p.add_argument("--api-key", metavar="KEY",
                   help="require the header 'Authorization: Bearer KEY' on /v1 (default: the DVLM_API_KEY "
                        "environment variable, else no key)")
    p.add_argument("--decoder", choices=SERVED_DECODERS,
                   help="decoder of requests that name none (default: block for converted models, else ar)")
    p.add_argument("--block-size", type=int, metavar="N",
                   help="block size of requests that give none (default: the model's)")
    policy = p.add_mutually_exclusive_group()
    policy.add_argument("--threshold", type=real, metavar="T",
                        help="confidence threshold of block decoding for requests that give none "
                             "(default: the model's)")
    policy.add_argument("--steps", type=int, metavar="S",
                        help="fixed denoising steps per block for requests that give neither threshold nor steps")
    p.add_argument("--max-batch-size", type=int, default=16, metavar="N",
                   help="rows decoded together (default: %(default)s)")
    p.add_argument("--max-queue", type=int, default=64, metavar="N",
                   help="requests waiting to start; more are refused with 429 and Retry-After (default: %(default)s)")
    p.add_argument("--max-prompt-tokens", type=int, metavar="N",
                   help="longest prompt in tokens, image tokens included (default: the model's positions)")
    p.add_argument("--max-tokens", type=int, default=512, metavar="N",
                   help="largest max_tokens a request may ask for, and the answer limit when it gives none "
                        "(default: %(default)s)")
    p.add_argument("--request-timeout", type=real, default=600.0, metavar="S",
                   help="wall-clock limit of one request in seconds (default: %(default)s)")
    p.add_argument("--max-body-mb", type=real, default=48.0, metavar="MB",
                   help="largest request body in MiB; data: URL images travel inside it (default: %(default)s)")
    p.add_argument("--max-images", type=int, default=16, metavar="N",
                   help="most images per request (default: %(default)s)")
    p.add_argument("--allow-local-images", metavar="DIR",
                   help="let requests name image files inside DIR (file:// URLs or paths; nothing outside DIR, "
                        "symlinks included); default: no local files")
    p.add_argument("--allow-remote-images", action="store_true",
                   help="let requests name http(s) image URLs, which the server downloads (size-capped, "
                        "time-limited) from whatever address a client names; default: data: URLs only")
    add_cache_arguments(p, "requests'")
    p.add_argument("--access-log", action="store_true", help="log every HTTP request on stderr")
    add_compile_argument(p)
    p.add_argument("--device", help="e.g. cpu, cuda:0 (default: auto)")
    p.add_argument("--dtype", choices=DTYPES, help=DTYPE_HELP)


def serve_settings(args: argparse.Namespace) -> Any:
    from dvlm.data.images import MIB
    from dvlm.serve.settings import ServeSettings

    local = None
    if args.allow_local_images is not None:
        local = Path(args.allow_local_images).expanduser()
        if not local.is_dir():
            raise CLIError(f"--allow-local-images: {local} is not a directory")
    max_body_bytes = int(args.max_body_mb * MIB)
    if max_body_bytes < 1:
        raise CLIError(f"--max-body-mb must be > 0 (one byte at least), got {args.max_body_mb:g}")
    api_key = args.api_key if args.api_key is not None else os.environ.get("DVLM_API_KEY") or None
    try:
        return ServeSettings(
            api_key=api_key, decoder=args.decoder, block_size=args.block_size, threshold=args.threshold,
            steps=args.steps, max_batch_size=args.max_batch_size, max_queue=args.max_queue,
            max_prompt_tokens=args.max_prompt_tokens, max_tokens=args.max_tokens,
            request_timeout_s=args.request_timeout, max_body_bytes=max_body_bytes,
            max_images=args.max_images, allow_local_images=local, allow_remote_images=args.allow_remote_images,
            compile=args.compile, **cache_sizes(args))
    except ConfigError as err:
        raise ConfigError(_flag_names(str(err))) from err


# ServeSettings fields whose messages should name the command-line flag the user typed.
SERVE_FLAGS = {"max_batch_size": "--max-batch-size", "max_queue": "--max-queue", "max_tokens": "--max-tokens",
               "max_prompt_tokens": "--max-prompt-tokens", "max_images": "--max-images",
               "request_timeout_s": "--request-timeout", "the API key": "--api-key (or DVLM_API_KEY)"}


def _flag_names(message: str) -> str:
    for field, flag in SERVE_FLAGS.items():
        if message.startswith(f"{field} "):
            return flag + message[len(field):]
    return message


def serve(args: argparse.Namespace) -> None:
    """Serve a model over an OpenAI-compatible HTTP API until SIGTERM or Ctrl-C."""
    settings = serve_settings(args)  # every setting is refused before the port is taken or the model loads
    if not 0 <= args.port <= 65535:
        raise CLIError(f"--port must be in [0, 65535], got {args.port}")
    server_modules = serve_modules()
    name = model_name(args.model)
    model = model_path(name)
    if args.host not in LOOPBACK_HOSTS and settings.api_key is None:
        print(f"dvlm serve: warning: listening on {args.host} without --api-key: anyone who can reach this "
              "machine can use the model", file=sys.stderr, flush=True)
    sock = listening_socket(args.host, args.port)
    try:
        with quiet_hf_progress():
            lm = dvlm.load(model, device=checked_device(args.device), dtype=args.dtype)
        app = server_modules.build_app(lm, name, settings)
        url = server_modules.url_of(sock)
        server_modules.run(app, sock, access_log=args.access_log, on_stop=app.state.dvlm.begin_shutdown,
                           on_ready=lambda: print(f"dvlm serve: {name} at {url} (OpenAI API under {url}/v1; "
                                                  "Ctrl-C to stop)", flush=True))
    finally:
        sock.close()
    print("dvlm serve: stopped", flush=True)


LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


def serve_modules() -> Any:
    """dvlm.serve.server, imported lazily: FastAPI and uvicorn come with the `serve` extra."""
    import importlib

    try:
        server = importlib.import_module("dvlm.serve.server")
        importlib.import_module("dvlm.serve.engine")  # checked now, before the model loads
    except ImportError as err:
        if err.name == "dvlm.serve.engine":
            raise CLIError("this installation of dvlm has no serving engine (dvlm.serve.engine)") from err
        raise CLIError(f"dvlm serve needs the serve extra ({err.name} is missing): pip install 'dvlm[serve]'") from err
    return server


def listening_socket(host: str, port: int) -> Any:
    from dvlm.serve.server import bind

    try:
        return bind(host, port)
    except OSError as err:
        raise CLIError(f"cannot listen on {host}:{port}: {err.strerror or err}") from err


def chat_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help=f"checkpoint directory or built-in name (default: {DEFAULT_MODEL})")
    p.add_argument("--image", action="append", metavar="FILE", help="image for your first message (repeatable)")
    p.add_argument("--decoder", choices=DECODERS, help="default: block for converted models, else ar")
    add_block_arguments(p)
    p.add_argument("--max-new-tokens", type=int, default=256, metavar="N",
                   help="answer length limit (default: %(default)s)")
    p.add_argument("--temperature", type=real, default=0.0, metavar="T", help="0 = greedy (default: %(default)s)")
    p.add_argument("--verbose", action="store_true", help="print each answer's tokens, forwards and reused prompt "
                                                          "tokens on stderr")
    add_cache_arguments(p, "the conversation's")
    p.add_argument("--device", help="e.g. cpu, cuda:0 (default: auto)")
    p.add_argument("--dtype", choices=DTYPES, help=DTYPE_HELP)


def add_cache_arguments(p: argparse.ArgumentParser, whose: str) -> None:
    from dvlm.decode.prompts import PREFIX_CACHE_MB, VISION_CACHE_MB

    p.add_argument("--vision-cache-mb", type=real, default=VISION_CACHE_MB, metavar="MB",
                   help=f"memory for {whose} image features, so an image is encoded once (MiB; 0: off; "
                        "default: %(default)s)")
    p.add_argument("--prefix-cache-mb", type=real, default=PREFIX_CACHE_MB, metavar="MB",
                   help=f"memory for the keys/values of {whose} earlier prompts and answers, so a prompt that "
                        "starts with them prefills only the rest (MiB; 0: off; default: %(default)s)")


def cache_sizes(args: argparse.Namespace) -> dict[str, float]:
    for flag, value in (("--vision-cache-mb", args.vision_cache_mb), ("--prefix-cache-mb", args.prefix_cache_mb)):
        if value < 0:
            raise CLIError(f"{flag} must be >= 0 (0: off), got {value:g}")
    return {"vision_cache_mb": args.vision_cache_mb, "prefix_cache_mb": args.prefix_cache_mb}


def chat(args: argparse.Namespace) -> None:
    """Talk to a model in the terminal; answers stream as blocks are committed."""
    from dvlm.config import DecodeConfig
    from dvlm.serve.chat import TerminalChat, run_chat

    options = {k: v for k, v in (("block_size", args.block_size), ("threshold", args.threshold),
                                 ("steps", args.steps)) if v is not None}
    options.update(max_new_tokens=args.max_new_tokens, temperature=args.temperature)
    DecodeConfig(**options)  # a bad setting fails now, not at the first question
    sizes = cache_sizes(args)
    images = [load_image(path) for path in args.image or []]  # bad images fail before the model loads
    with quiet_hf_progress():
        lm = dvlm.load(model_path(args.model), device=checked_device(args.device), dtype=args.dtype)
    decoder = args.decoder or ("block" if lm.diffusion else "ar")
    if decoder not in ("ar", "hf"):
        lm.require_diffusion(decoder)
    session = TerminalChat(lm, {**options, **sizes, "decoder": decoder})
    session.pending_images.extend(images)
    run_chat(session, input, sys.stdout, sys.stderr, verbose=args.verbose)


# -- the verb table and main ---------------------------------------------------------------------
@dataclass(frozen=True)
class Verb:
    help: str
    arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], None]


VERBS: dict[str, Verb] = {
    "assemble": Verb("join a causal language model and a vision tower into an AR VLM (new projector)",
                     assemble_arguments, assemble),
    "convert": Verb("convert an AR vision-language checkpoint into a block-diffusion one", convert_arguments, convert),
    "train": Verb("fine-tune a converted model on LLaVA-format data", train_arguments, train),
    "generate": Verb("answer a prompt (with images) using a model", generate_arguments, generate),
    "eval": Verb("score a model on a built-in task or a benchmark's files (accuracy and speed)", eval_arguments,
                 evaluate),
    "bench": Verb("benchmark decoders side by side: accuracy, tokens/forward, tokens/s", bench_arguments, bench),
    "serve": Verb("serve a model over an OpenAI-compatible HTTP API", serve_arguments, serve),
    "chat": Verb("chat with a model in the terminal, answers streamed", chat_arguments, chat),
    "demo": Verb("the whole pipeline on the built-in models, offline, in a few minutes", demo_arguments, demo),
    "zoo": Verb("rebuild (or list) the built-in models", zoo_arguments, zoo),
    "quantize": Verb("quantize a model's language layers with torchao (int8, fp8)", quantize_arguments, quantize),
    "ablate": Verb("the papers' recipe claims at small scale: one fine-tune per variant", ablate_arguments, ablate),
}


def checked_device(name: str | None) -> str | None:
    """The --device value, refused early (as a usage error) when it cannot be used here."""
    try:
        pick_device(name)
    except (RuntimeError, ValueError) as err:
        raise CLIError(f"--device {name!r}: {err}") from err
    return name


@contextmanager
def quiet_hf_progress() -> Iterator[None]:
    """Hide transformers' progress bars (weight loading, shard writing) for the duration."""
    from transformers.utils import logging as hf_logging

    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if shown:
            hf_logging.enable_progress_bar()


class VerbParser(argparse.ArgumentParser):
    """A verb's parser: a usage error is one line, `dvlm VERB: error: ...` (exit status 2), like
    every other refusal; `--help` shows the usage."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dvlm", description=dvlm.__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"dvlm {dvlm.__version__}")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB", parser_class=VerbParser)
    for name, verb in VERBS.items():
        sub = verbs.add_parser(name, help=verb.help, description=verb.help)
        verb.arguments(sub)
        sub.set_defaults(run=verb.run, parser=sub)
    return parser


# OSErrors a user causes and fixes: unwritable or full destinations.
USER_OS_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.ENAMETOOLONG}


def main(argv: list[str] | None = None) -> int:
    """Run the `dvlm` command; returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args, unknown = build_parser().parse_known_args(argv)
        if unknown:  # reported by the verb, in one line, like its other usage errors
            args.parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    except SystemExit as stop:  # --help, --version and usage errors: argparse has printed them
        return stop.code if isinstance(stop.code, int) else 2
    args.argv = argv  # `dvlm train --num-processes` runs the same command again under the launcher
    try:
        args.run(args)
        sys.stdout.flush()  # a full or closed stdout fails here, inside the handler, not at exit
    except EXPECTED_ERRORS as err:
        return _fail(args.verb, str(err))
    except OSError as err:
        if err.errno not in USER_OS_ERRNOS and not isinstance(err, BrokenPipeError):
            raise
        return _fail(args.verb, _os_error_message(err))
    return 0


def _fail(verb: str, message: str) -> int:
    """Print the one-line error; stdout is detached so that exiting does not try to flush it again."""
    print(f"dvlm {verb}: error: {' '.join(message.split())}", file=sys.stderr)
    try:
        sys.stdout.flush()
    except OSError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    return 2


def _os_error_message(err: OSError) -> str:
    where = f" {err.filename}" if err.filename else " stdout" if err.errno == errno.ENOSPC else ""
    return f"cannot write{where}: {err.strerror or err}"


def writable_directory(path: Path) -> Path:
    """Create `path` if needed and prove it takes a file, before any long work is spent on its contents."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".dvlm-write-check-"):
            pass
    except OSError as err:
        raise CLIError(f"cannot write to {path}: {err.strerror or err}") from err
    return path
