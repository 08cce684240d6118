"""dvlm as an lmms-eval model: `lmms-eval --model dvlm --model_args pretrained=DIR,decoder=block,...`.

Registered through lmms-eval's entry-point group `lmms_eval.models` (pyproject: the `lmms-eval`
extra); `manifest` is the entry point. Only `generate_until` is answered; log-likelihood and
multi-round requests raise `UnsupportedRequestError`. After each `generate_until` call the speed
(tokens per forward, tokens/s, forwards) goes to lmms-eval's throughput log, which lmms-eval writes
into the results JSON (`"throughput"`) next to the scores, and to its log.

This module imports lmms-eval; the request handling lives in `dvlm.eval.lmms_answers`.
"""

from __future__ import annotations

from typing import Any

from lmms_eval.api.model import lmms

from dvlm.eval.lmms_answers import (
    PluginSettings,
    SpeedTally,
    UnsupportedRequestError,
    answer_batch,
    decode_options,
    plugin_settings,
    stop_strings,
)

MODEL_ID = "dvlm"


def manifest() -> Any:
    """The entry point: lmms-eval calls it and registers the returned manifest."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path=f"{__name__}.DVLMLmms")


class DVLMLmms(lmms):
    """A dvlm checkpoint answering lmms-eval's generation tasks with a dvlm decoder."""

    is_simple = True  # text prompt + doc_to_visual, not lmms-eval's chat messages

    def __init__(self, pretrained: str, **model_args: Any) -> None:
        super().__init__()
        import dvlm

        self.settings: PluginSettings = plugin_settings(pretrained=pretrained, **model_args)
        self.lm = dvlm.load(self.settings.pretrained, device=self.settings.device, dtype=self.settings.dtype,
                            **({"quantize": self.settings.quantize} if self.settings.quantize else {}))

    @property
    def batch_size(self) -> int:
        return self.settings.batch_size

    def generate_until(self, requests: list[Any]) -> list[str]:
        answers: list[str] = []
        tally = SpeedTally()
        for batch in self._batches(requests):
            contexts, gen_kwargs = [r.args[0] for r in batch], batch[0].args[1]
            visuals = [self._visuals(r) for r in batch]
            answers += answer_batch(self.lm, contexts, visuals, decode_options(self.settings, gen_kwargs),
                                    stop_strings(gen_kwargs), tally)
        self._log_speed(tally)
        return answers

    def _batches(self, requests: list[Any]) -> list[list[Any]]:
        """Consecutive requests with equal generation kwargs, up to batch_size each (order kept)."""
        batches: list[list[Any]] = []
        for request in requests:
            last = batches[-1] if batches else None
            if last and len(last) < self.batch_size and last[0].args[1] == request.args[1]:
                last.append(request)
            else:
                batches.append([request])
        return batches

    def _visuals(self, request: Any) -> list[Any]:
        _, _, doc_to_visual, doc_id, task, split = request.args
        visuals = doc_to_visual(self.task_dict[task][split][doc_id])
        return [v for v in visuals or [] if v is not None]

    def _log_speed(self, tally: SpeedTally) -> None:
        from lmms_eval.models.model_utils.gen_metrics import log_metrics

        summary = tally.summary()
        log_metrics(total_elapsed_time=summary["seconds"], total_gen_tokens=summary["tokens"],
                    avg_speed=summary["tokens_per_second"],
                    additional_metrics={"tokens_per_forward": summary["tokens_per_forward"], "nfe": summary["nfe"],
                                        "num_requests": summary["requests"]})

    def loglikelihood(self, requests: list[Any]) -> list[tuple[float, bool]]:
        raise UnsupportedRequestError(
            "dvlm's lmms-eval plugin answers generation tasks (output_type generate_until) only; "
            "log-likelihood tasks are not supported: pick the task's generation variant")

    def generate_until_multi_round(self, requests: list[Any]) -> list[str]:
        raise UnsupportedRequestError("dvlm's lmms-eval plugin does not answer multi-round tasks "
                                      "(generate_until_multi_round)")
