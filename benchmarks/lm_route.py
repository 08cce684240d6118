"""DiffusionVL's LM -> dVLM route at small scale on the built-in tasks (not a timed benchmark).

1. a tiny Qwen2 causal LM is trained here on the tasks' text alone (questions and answers in
   ChatML, no images): the stand-in for a pretrained language model;
2. `dvlm assemble` joins it with a small random SigLIP tower (28 px tiles, 14 px patches);
3. the projector is aligned with the AR loss, LM and tower frozen (`--trainable projector --ar`);
4. `dvlm convert` (fast-dvlm, block 8), then diffusion fine-tuning of the whole model;
5. each stage is scored on the tasks' test split (AR decoding; block decoding for the dVLM).

    PYTHONPATH=src python benchmarks/lm_route.py --work /tmp/lm-route --out benchmarks/lm-route-cpu.json

Sizes and steps are flags; the defaults take roughly 20-40 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM, SiglipVisionConfig, SiglipVisionModel

import dvlm
from dvlm.config import TrainConfig
from dvlm.convert.assembly import assemble_checkpoint
from dvlm.convert.conversion import convert_checkpoint
from dvlm.data.chat import IMAGE_PLACEHOLDER
from dvlm.eval.harness import evaluate
from dvlm.tasks.builtin import export_llava, get_task
from dvlm.train.loop import train
from dvlm.zoo.tokenizer import UNK_TOKEN, pre_tokenizer, vocabulary

SPECIALS = (UNK_TOKEN, "<|endoftext|>", "<|im_start|>", "<|im_end|>")
MIX = {"shapes-qa": 3000, "shapes-caption": 1500, "digits-read": 3000}
EVAL_TASKS = ("shapes-qa", "shapes-caption", "digits-read")


def text_tokenizer() -> PreTrainedTokenizerFast:
    """The tasks' word-level vocabulary with ChatML tokens and no image token (a text LM's)."""
    vocab = {token: i for i, token in enumerate(vocabulary(SPECIALS))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    backend.pre_tokenizer = pre_tokenizer()
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token=UNK_TOKEN, pad_token="<|endoftext|>",
                                   eos_token="<|im_end|>", extra_special_tokens=list(SPECIALS[2:]),
                                   clean_up_tokenization_spaces=False)


def chat_texts(data: Path) -> list[str]:
    """The records as ChatML text with the image placeholders removed: what the text LM reads."""
    texts = []
    for record in json.loads(data.read_text()):
        turns = [f"<|im_start|>{'user' if t['from'] == 'human' else 'assistant'}\n"
                 f"{t['value'].replace(IMAGE_PLACEHOLDER + chr(10), '')}<|im_end|>\n" for t in record["conversations"]]
        texts.append("".join(turns))
    return texts


def train_text_lm(out: Path, data: Path, hidden: int, layers: int, steps: int, batch: int, lr: float) -> Path:
    tokenizer = text_tokenizer()
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=3 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=1024, tie_word_embeddings=True, bos_token_id=None,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model = Qwen2ForCausalLM(config).train()
    texts = chat_texts(data)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 50) * (1 - s / steps))
    rng = random.Random(0)
    for step in range(steps):
        enc = tokenizer(rng.sample(texts, batch), padding=True, return_tensors="pt")
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        loss = model(**enc, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        if step % 100 == 0 or step == steps - 1:
            print(f"text LM step {step + 1}/{steps} loss {loss.item():.3f}", flush=True)
    model.eval().save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def build_tower(out: Path, hidden: int) -> Path:
    torch.manual_seed(1)
    config = SiglipVisionConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                                num_attention_heads=2, image_size=28, patch_size=14, vision_use_head=False)
    SiglipVisionModel(config).save_pretrained(out, safe_serialization=True)
    return out


def scores(model_dir: Path, decoders: list[str], limit: int) -> dict[str, dict[str, float]]:
    lm = dvlm.load(model_dir)
    found = {}
    for decoder in decoders:
        for task in EVAL_TASKS:
            result = evaluate(lm, task, limit=limit, decoder=decoder, max_new_tokens=48, progress=False)
            found[f"{task} [{decoder}]"] = {**result.metrics, "tokens_per_nfe": result.speed["tokens_per_nfe"]}
            print(f"  {model_dir.name} {task} [{decoder}]: {result.metrics} ({result.examples[0]['prediction']!r})",
                  flush=True)
    return found


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True, help="results JSON")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--text-steps", type=int, default=800)
    p.add_argument("--align-steps", type=int, default=400)
    p.add_argument("--diffusion-steps", type=int, default=800)
    p.add_argument("--limit", type=int, default=50, help="test samples per task")
    args = p.parse_args()
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    samples = [s for task, n in MIX.items() for s in get_task(task).generate("train", n, seed=0)]
    data = export_llava(samples, work / "data")
    text_lm = train_text_lm(work / "text-lm", data, args.hidden, args.layers, args.text_steps, 32, 1e-3)
    tower = build_tower(work / "tower", hidden=64)
    assemble_checkpoint(text_lm, tower, work / "assembled", overwrite=True)
    results = {"settings": vars(args) | {"work": str(work), "out": str(args.out), "mix": MIX},
               "assembled": scores(work / "assembled", ["ar"], args.limit)}
    align = TrainConfig(max_steps=args.align_steps, batch_size=16, learning_rate=1e-3, warmup_ratio=0.03,
                        objective="autoregressive", trainable="projector", log_every=20, max_length=512)
    aligned = train(work / "assembled", data, work / "run-align", align, progress=False)
    results["aligned"] = scores(aligned.model_dir, ["ar"], args.limit) | {"final_loss": aligned.losses[-1]}
    convert_checkpoint(aligned.model_dir, work / "converted", block_size=8, overwrite=True)
    tune = TrainConfig(max_steps=args.diffusion_steps, batch_size=16, learning_rate=3e-4, warmup_ratio=0.03,
                       log_every=20, max_length=512)
    tuned = train(work / "converted", data, work / "run-dvlm", tune, progress=False)
    results["dvlm"] = scores(tuned.model_dir, ["block", "ar"], args.limit) | {"final_loss": tuned.losses[-1]}
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
