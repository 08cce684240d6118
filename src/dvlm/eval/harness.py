"""Evaluate a model on a built-in task: accuracy and speed from the same decoding run."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from tqdm.auto import tqdm

from dvlm.data.chat import IMAGE_PLACEHOLDER, SPEAKER_ROLES
from dvlm.decode.generate import generate
from dvlm.decode.output import GenerationOutput
from dvlm.model.loaded import LoadedModel
from dvlm.tasks.builtin import Sample, get_task
from dvlm.tasks.metrics import aggregate, score


@dataclass
class EvalResult:
    task: str
    decoder: str
    split: str
    num_samples: int
    metrics: dict[str, float]
    speed: dict[str, float]
    settings: dict[str, Any] = field(default_factory=dict)
    examples: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def sample_prompt(sample: Sample) -> list[dict[str, str]]:
    """The chat up to the last question, earlier answers given as history (teacher forcing)."""
    turns = sample.conversations[:-1]
    return [{"role": SPEAKER_ROLES[t["from"]], "content": t["value"]} for t in turns]


def speed_summary(outputs: list[GenerationOutput], wall_seconds: float) -> dict[str, float]:
    tokens = sum(o.num_tokens for o in outputs)
    nfe = sum(o.nfe for o in outputs)
    return {
        "tokens": tokens,
        "nfe": nfe,
        "tokens_per_nfe": round(tokens / nfe, 3) if nfe else 0.0,
        "seconds": round(wall_seconds, 4),
        "tokens_per_second": round(tokens / wall_seconds, 2) if wall_seconds > 0 else 0.0,
        "ttft_s": round(sum(o.timings.get("prefill_s", 0.0) for o in outputs) / max(len(outputs), 1), 5),
    }


def evaluate(
    lm: LoadedModel,
    task: str,
    *,
    split: str = "test",
    limit: int = 100,
    seed: int = 0,
    decoder: str | None = None,
    batch_size: int = 1,
    max_new_tokens: int = 96,
    progress: bool = True,
    keep_examples: int = 3,
    **decode_options: Any,
) -> EvalResult:
    """Decode `limit` samples of `task` and score them with the task's metric. `settings` records
    the harness's settings and the decoding settings used (the model's defaults filled in)."""
    samples = get_task(task).generate(split, limit, seed)
    decoder = decoder or lm.default_decoder
    outputs: list[GenerationOutput] = []
    wall = 0.0
    bar = tqdm(total=len(samples), desc=f"{task} [{decoder}]", disable=not progress, leave=False)
    for start in range(0, len(samples), batch_size):
        chunk = samples[start:start + batch_size]
        prompts = [sample_prompt(s) for s in chunk]
        images = [s.images for s in chunk]
        outs = generate(lm, prompts, images, decoder=decoder, max_new_tokens=max_new_tokens, **decode_options)
        wall += max(o.timings.get("total_s", 0.0) for o in outs)  # the batch's time: until its last row finished
        outputs.extend(outs)
        bar.update(len(chunk))
    bar.close()
    scores = [score(task, out.text, sample) for out, sample in zip(outputs, samples)]
    examples = [
        {"id": s.id, "prompt": s.conversations[-2]["value"].replace(IMAGE_PLACEHOLDER + "\n", ""),
         "reference": s.answers[-1], "prediction": o.text}
        for s, o in list(zip(samples, outputs))[:keep_examples]
    ]
    # The decoding settings used (resolved: the model's defaults filled in), and the harness's own.
    settings = {**(outputs[0].settings if outputs else {}), "batch_size": batch_size, "sample_seed": seed}
    return EvalResult(task, decoder, split, len(samples), aggregate(scores), speed_summary(outputs, wall),
                      settings, examples)
