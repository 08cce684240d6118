"""LoRA fine-tuning through `peft`: low-rank updates of the language model, plus the token rows a
diffusion model cannot do without.

A converted dVLM learns one new token, the mask. Its embedding row (and, when the output layer is
not tied to the embedding, its output row) starts from the mean of the vocabulary, so it must train
even when every other weight is frozen; peft's trainable-token wrappers train exactly those rows and
store only their deltas. LoRA goes into the model in place (`peft.tuners.lora.LoraModel`), so the
adapter seams keep working on the same module; at the end the updates are merged into the weights
and the final model is a plain checkpoint like any other.

Step checkpoints of a LoRA run hold only what trains (the LoRA matrices and token rows, in
safetensors) beside the optimizer state; resuming loads the run's base model again and puts them
back, which makes the resumed run exactly the uninterrupted one.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from torch import nn

from dvlm.config import LoraSettings, LoraSpecError, parse_lora

ADAPTER_FILE = "adapter_model.safetensors"
"""The trained LoRA and token-row tensors of a LoRA checkpoint."""
def require_peft() -> None:
    """Fail before anything loads when peft is missing."""
    if importlib.util.find_spec("peft") is None:
        raise LoraSpecError("LoRA training needs peft: pip install 'dvlm[lora]'")


def target_modules(model: nn.Module, adapter, suffixes: tuple[str, ...] = ()) -> list[str]:
    """Names of the linear layers LoRA adapts: outside the vision encoder, not the output layer."""
    vision = {id(p) for p in adapter.vision_parameters(model)}
    output = model.get_output_embeddings()
    names = [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear)
        and module is not output
        and not any(id(p) in vision for p in module.parameters(recurse=False))
    ]
    if suffixes:
        names = [name for name in names if name.split(".")[-1] in suffixes or name.endswith(suffixes)]
        if not names:
            raise LoraSpecError(f"no linear layer of the language model matches targets {'+'.join(suffixes)}")
    return names


def attach(model: nn.Module, adapter, settings: LoraSettings, token_ids: list[int]):
    """Put LoRA into `model` in place; only LoRA weights and the rows of `token_ids` stay trainable."""
    from peft import LoraConfig
    from peft.tuners.lora import LoraModel

    names = target_modules(model, adapter, settings.targets)
    embedding_name = _module_name(model, model.get_input_embeddings())
    rows = {embedding_name: list(token_ids)} if token_ids else None
    config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=names,
        trainable_token_indices=rows,
    )
    return LoraModel(model, config, "default")  # freezes everything else; `model` stays the module


def merge(lora_model) -> nn.Module:
    """The model with the LoRA updates and token rows merged in, peft's wrappers removed."""
    return lora_model.merge_and_unload()


def adapter_state(model: nn.Module) -> dict:
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(model)


def load_adapter_state(model: nn.Module, path: Path) -> None:
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    saved = load_file(path / ADAPTER_FILE)
    try:
        result = set_peft_model_state_dict(model, saved)
    except RuntimeError as err:  # torch's "size mismatch for ..." lines: another rank r
        mismatch = next((line.strip() for line in str(err).splitlines() if "size mismatch" in line), str(err))
        raise ValueError(f"{path / ADAPTER_FILE} does not match this LoRA setting ({mismatch})") from err
    # A tied output layer shares the embedding's token rows: peft saves them once.
    state = model.state_dict(keep_vars=True)
    loaded = {state[k].data_ptr() for k in state if k.replace(".default", "") in saved or k in saved}
    missing = [
        k
        for k in result.missing_keys
        if ("lora_" in k or "trainable_tokens" in k) and state[k].data_ptr() not in loaded
    ]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"{path / ADAPTER_FILE} does not match this LoRA setting "
            f"(missing {missing[:3]}, unexpected {list(result.unexpected_keys)[:3]})"
        )


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def _module_name(model: nn.Module, target: nn.Module) -> str:
    for name, module in model.named_modules():
        if module is target:
            return name.split(".")[-1]  # peft matches the key as a name suffix
    raise ValueError("the input embedding is not a submodule of the model")
