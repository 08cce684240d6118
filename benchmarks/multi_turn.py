"""A 4-turn conversation about one 448x448 picture, with and without the prefix and vision caches:
time to first token and total time of each turn (issue 22).

Two ways in, each measured with the caches on and off, side by side in this run:
* library: `model.chat()` sessions (`--prefix-cache-mb 0 --vision-cache-mb 0` for "off"), the two
  sessions' turns interleaved in one process; time to first token is the first text piece;
* served (`--served`): two real `dvlm serve` processes (caches on by default, and off), driven
  turn by turn, alternately, by the `openai` client with streaming; time to first token is the
  first streamed text. (The library model is freed first.)

Models: `tiny-dvlm` (the built-in model; its processor shrinks the picture to 16 image tokens), or
a random model built here once in a published shape, bfloat16 (`--model 3b`: Qwen2.5-VL-3B, the
picture kept at 448x448 = 256 image tokens; `--model small` for a quick check of that path),
converted with `dvlm convert`. Its tokenizer is the built-in one widened with filler words to the
shape's vocabulary (`widen_tokenizer`), so that random ids decode to words that encode back to
the same ids: the answers are text, streamed piece by piece, and later turns carry them.

    python benchmarks/multi_turn.py --quick                      # tiny-dvlm, small settings: a smoke run
    python benchmarks/multi_turn.py --model tiny-dvlm --served --repeats 5 --json multi-turn-tiny.json
    python benchmarks/multi_turn.py --model 3b --work /tmp/dvlm-3b --served --json multi-turn-3b.json

Ratios are cached / uncached for the same turn in this run (medians over `--repeats`).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from PIL import Image

import dvlm
from dvlm.tasks.builtin import get_task

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_load import launch_server  # noqa: E402
from train_layout import build_source, dvlm_command  # noqa: E402

QUESTIONS = ["Describe the image.", "How many shapes are there?", "What colour is the largest shape?",
             "Where is it in the picture?"]
PICTURE_SIDE = 448
OFF = {"prefix_cache_mb": 0, "vision_cache_mb": 0}


def picture(repeat: int = 0) -> Image.Image:
    """A shapes scene from the built-in task, at 448x448: another one for each repeat, so that no
    repeat finds an earlier repeat's conversation in the server's prefix cache."""
    scene = get_task("shapes-caption").generate("test", 1, seed=3 + repeat)[0].images[0]
    return scene.convert("RGB").resize((PICTURE_SIDE, PICTURE_SIDE), Image.BICUBIC)


def model_path(name: str, work: Path | None) -> str:
    """A built-in model's name, or the directory of a random model of a published shape (built once)."""
    if name not in ("3b", "small"):
        return name
    if work is None:
        raise SystemExit(f"--model {name} needs --work DIR (where the random model is built once)")
    model = work / f"{name}-dvlm"
    if not (model / "config.json").exists():
        source = work / f"{name}-source"
        build_source(source, name, PICTURE_SIDE, dtype=torch.bfloat16)
        widen_tokenizer(source)
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        subprocess.run(dvlm_command("convert", "--model", str(source), "--out", str(model), "--dtype", "bfloat16",
                                    "--overwrite"), env=env, check=True)
        shutil.rmtree(source)
    return str(model)


def widen_tokenizer(checkpoint: Path) -> None:
    """Give the checkpoint's word-level tokenizer one filler word per id up to the model's vocabulary
    ("zqa", "zqb", ...: letters only, so each stays one token), so every id the model can produce
    decodes to a word that encodes back to it."""
    path = checkpoint / "tokenizer.json"
    tokenizer = json.loads(path.read_text())
    vocab = tokenizer["model"]["vocab"]
    size = json.loads((checkpoint / "config.json").read_text())["text_config"]["vocab_size"]
    taken = max([*vocab.values(), *(t["id"] for t in tokenizer["added_tokens"])]) + 1
    for token_id in range(taken, size):
        word, n = "", token_id
        while True:
            word, n = chr(ord("a") + n % 26) + word, n // 26
            if n == 0:
                break
        vocab["\u0120zq" + word] = token_id  # Ġ: a leading space under ByteLevel
    path.write_text(json.dumps(tokenizer))


# -- library -------------------------------------------------------------------------------------


def library_turn(session, question: str, images) -> dict[str, Any]:
    first: list[float] = []
    start = time.perf_counter()
    out = session.send(question, images, on_text=lambda _: first or first.append(time.perf_counter()))
    total = time.perf_counter() - start
    return {"ttft_s": (first[0] - start) if first else total, "total_s": total, "prefill_s": out.timings["prefill_s"],
            "prompt_tokens": out.prompt_tokens, "cached_tokens": out.cached_tokens, "tokens": out.num_tokens,
            "nfe": out.nfe, "text": out.text}


def library_runs(lm, decoder: str, options: dict[str, Any], repeats: int) -> dict[str, list[list[dict]]]:
    """Per mode ("on", "off"), per repeat, the 4 turns; the two sessions' turns alternate."""
    runs: dict[str, list[list[dict]]] = {"on": [], "off": []}
    for repeat in range(repeats):
        image = picture(repeat)
        sessions = {"on": lm.chat(decoder=decoder, **options), "off": lm.chat(decoder=decoder, **options, **OFF)}
        order = ["on", "off"] if repeat % 2 == 0 else ["off", "on"]
        turns: dict[str, list[dict]] = {"on": [], "off": []}
        for i, question in enumerate(QUESTIONS):
            for mode in order:
                turns[mode].append(library_turn(sessions[mode], question, [image] if i == 0 else None))
        for mode in runs:
            runs[mode].append(turns[mode])
    return runs


# -- served --------------------------------------------------------------------------------------


def start_server(model: str, extra: list[str]) -> tuple[subprocess.Popen, str]:
    return launch_server(["--model", model, "--max-tokens", "4096", *extra], ready_s=600)  # a 3B model loads in minutes


def data_url(image: Image.Image) -> str:
    import base64
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def served_turn(client, model: str, messages: list[dict], knobs: dict[str, Any]) -> dict[str, Any]:
    start = time.perf_counter()
    first, pieces, final, prompt_tokens = None, [], None, None
    stream = client.chat.completions.create(model=model, messages=messages, temperature=0, stream=True,
                                            stream_options={"include_usage": True}, extra_body=knobs)
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            first = first or time.perf_counter()
            pieces.append(chunk.choices[0].delta.content)
        if chunk.choices and chunk.choices[0].finish_reason:
            final = chunk.model_extra.get("dvlm", {})
        if chunk.usage is not None:
            prompt_tokens = chunk.usage.prompt_tokens
    total = time.perf_counter() - start
    return {"ttft_s": (first - start) if first else total, "total_s": total,
            "prompt_tokens": prompt_tokens, "cached_tokens": (final or {}).get("cached_tokens"), "nfe": (final or {}).get("nfe"), "text": "".join(pieces)}


def served_runs(model: str, decoder: str, options: dict[str, Any], repeats: int) -> dict[str, list[list[dict]]]:
    import openai

    servers = {"on": start_server(model, []), "off": start_server(model, ["--prefix-cache-mb", "0",
                                                                         "--vision-cache-mb", "0"])}
    knobs = {"decoder": decoder, "max_tokens": options["max_new_tokens"],
             **{k: v for k, v in options.items() if k != "max_new_tokens"}}
    try:
        clients = {mode: openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=3600)
                   for mode, (_, url) in servers.items()}
        for client in clients.values():  # warm-up, text only: nothing of the measured conversation is kept
            served_turn(client, model, [{"role": "user", "content": "Hi"}], knobs)
        runs: dict[str, list[list[dict]]] = {"on": [], "off": []}
        for repeat in range(repeats):
            image_url = data_url(picture(repeat))
            history = {mode: [] for mode in runs}
            turns: dict[str, list[dict]] = {mode: [] for mode in runs}
            for i, question in enumerate(QUESTIONS):
                parts = ([{"type": "image_url", "image_url": {"url": image_url}}] if i == 0 else [])
                for mode in (["on", "off"] if repeat % 2 == 0 else ["off", "on"]):
                    history[mode].append({"role": "user", "content": [*parts, {"type": "text", "text": question}]})
                    turn = served_turn(clients[mode], model, history[mode], knobs)
                    history[mode].append({"role": "assistant", "content": turn["text"]})
                    turns[mode].append(turn)
            for mode in runs:
                runs[mode].append(turns[mode])
        return runs
    finally:
        for server, _ in servers.values():
            server.terminate()
            server.wait(60)


# -- reporting -----------------------------------------------------------------------------------


def summary(runs: dict[str, list[list[dict]]]) -> list[dict[str, Any]]:
    """Per turn: medians over the repeats, with and without the caches, and their ratios."""
    rows = []
    for turn in range(len(QUESTIONS)):
        row: dict[str, Any] = {"turn": turn + 1}
        for mode in ("on", "off"):
            for field in ("ttft_s", "total_s", "prefill_s", "cached_tokens", "prompt_tokens", "tokens"):
                values = [run[turn][field] for run in runs[mode] if run[turn].get(field) is not None]
                if values:
                    row[f"{field}_{mode}"] = round(statistics.median(values), 4)
        row["ttft_ratio"] = round(row["ttft_s_on"] / row["ttft_s_off"], 3)
        row["total_ratio"] = round(row["total_s_on"] / row["total_s_off"], 3)
        row["same_answers"] = all(a[turn]["text"] == b[turn]["text"] for a, b in zip(runs["on"], runs["off"]))
        rows.append(row)
    return rows


def table(title: str, rows: list[dict[str, Any]]) -> str:
    lines = [f"\n{title}\n", "| turn | prompt tok | reused tok | TTFT on s | TTFT off s | TTFT on/off | total on s | "
             "total off s | total on/off | same answer |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['turn']} | {r.get('prompt_tokens_off', '')} | {r.get('cached_tokens_on', '')} | "
                     f"{r['ttft_s_on']:.3f} | {r['ttft_s_off']:.3f} | {r['ttft_ratio']:.3f} | {r['total_s_on']:.3f} | "
                     f"{r['total_s_off']:.3f} | {r['total_ratio']:.3f} | {r['same_answers']} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny-dvlm", help="a checkpoint, a built-in name, or 3b / small (random, "
                                                             "built in --work)")
    parser.add_argument("--work", type=Path, help="where --model 3b / small is built (kept for later runs)")
    parser.add_argument("--decoders", default="ar,spec,block")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--block-size", type=int, help="default: the model's")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--served", action="store_true", help="also through two real `dvlm serve` processes")
    parser.add_argument("--quick", action="store_true", help="tiny-dvlm, 8 new tokens, one repeat, served too")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.quick:
        args.model, args.max_new_tokens, args.repeats, args.served = "tiny-dvlm", 8, 1, True
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = model_path(args.model, args.work)
    options = {"max_new_tokens": args.max_new_tokens, **({"block_size": args.block_size} if args.block_size else {})}
    lm = dvlm.load(path)
    lm.generate("Hi", max_new_tokens=2)  # warm-up
    result: dict[str, Any] = {"model": args.model, "device": str(lm.device), "dtype": str(lm.adapter.model_dtype(lm.model)),
                              "torch_threads": torch.get_num_threads(), "options": options, "library": {}, "served": {}}
    decoders = args.decoders.split(",")
    for decoder in decoders:
        knobs = {k: v for k, v in options.items() if decoder != "ar" or k != "block_size"}
        result["library"][decoder] = summary(library_runs(lm, decoder, knobs, args.repeats))
        print(table(f"library, {args.model}, {decoder}", result["library"][decoder]), flush=True)
    del lm
    gc.collect()
    if args.served:
        for decoder in decoders:
            knobs = {k: v for k, v in options.items() if decoder != "ar" or k != "block_size"}
            result["served"][decoder] = summary(served_runs(path, decoder, knobs, args.repeats))
            print(table(f"served, {args.model}, {decoder}", result["served"][decoder]), flush=True)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
