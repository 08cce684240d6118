"""Post-training quantization of a dVLM's language model through torchao (`dvlm quantize`).

Schemes (torchao 0.18 configs):

| scheme | torchao config | runs on |
|---|---|---|
| `int8-weight` | `Int8WeightOnlyConfig`: int8 weights, per-channel scales; activations stay float | CPU, CUDA |
| `int8-dynamic` | `Int8DynamicActivationInt8WeightConfig`: W8A8, activations quantized per token at run time | CPU, CUDA |
| `fp8` | `Float8DynamicActivationFloat8WeightConfig`: W8A8 float8 (Fast-dVLM's last speed-up) | CUDA, compute capability >= 8.9 only |

Only the language side's `nn.Linear` layers are quantized (the decoder layers and the projector,
which trains with the language model): the vision encoder (the adapter's `vision_parameters`)
stays in the model's precision, as Fast-dVLM keeps its ViT in BF16, and so does the output layer,
whose logits give the confidences that decide what block decoding unmasks. Embeddings (the mask
token's row among them) are not Linear layers and are never quantized.

Invariant 5 per model: with `int8-weight` the activations stay float, and self-speculative
decoding equals AR decoding of the quantized model token for token, as unquantized. With
`int8-dynamic` each token's activations are quantized on their own (rows never mix), but the
float rounding difference between a 1-token and a B-token forward can push an activation across
an int8 rounding boundary: one int8 step, which moves the logits by up to ~0.07 on the built-in
model. So spec and AR agree except where AR's next token is such a near-tie (tested), as they
would between any two kernels of different rounding.

Saving: dvlm loads weights only from safetensors, and torchao's quantized tensors reach
safetensors only through a prototype API (`torchao.prototype.safetensors`). So `write_quantized`
copies the full-precision checkpoint and records the scheme in config.json (`dvlm_quantization`);
`dvlm.load` quantizes at load time. The directory is as large as its source; loading costs one
quantization pass (seconds).

On CPU, int8 is a speed-up only under the compiled decode path (`DecodeConfig.compile`,
`dvlm.decode.compiled`): torchao writes its CPU int8 paths as decomposed ops for torch.compile to
fuse, and eagerly int8-weight converts its weights to float inside every matmul (int8-dynamic adds
the activation quantization as separate ops), which is slower than float. Compiled, Inductor turns
int8-weight's dequantize-and-matmul into one int8 kernel that reads half the bytes of bf16. A
model quantized after it was compiled must be compiled anew (`dvlm.decode.compiled.forget_compiled`;
`dvlm.load(..., quantize=...)` quantizes before anything compiles). `benchmarks/quantize.py`
(built-in model) and `benchmarks/real_size.py` (3B shapes, eager and compiled) measure the speed.

torchao is an optional extra (`pip install 'dvlm[quantize]'`), imported only when quantizing.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dvlm.config import ConfigError

SCHEMES = ("int8-weight", "int8-dynamic", "fp8")
RECIPE_KEY = "dvlm_quantization"
"""config.json key of a quantized checkpoint: {"scheme": ..., "kept": [...]}."""
FP8_MIN_CAPABILITY = (8, 9)  # torchao's float8 matmuls: Ada, Hopper and later
TORCHAO_CONFIGS = {"int8-weight": "Int8WeightOnlyConfig", "int8-dynamic": "Int8DynamicActivationInt8WeightConfig",
                   "fp8": "Float8DynamicActivationFloat8WeightConfig"}


class QuantizationError(ConfigError):
    """A scheme that cannot be applied here (unknown, torchao missing, no FP8-capable GPU)."""


def check_scheme(scheme: str) -> str:
    if scheme not in SCHEMES:
        raise QuantizationError(f"unknown quantization scheme {scheme!r}; choose one of {', '.join(SCHEMES)}")
    return scheme


def torchao_quantization() -> Any:
    """`torchao.quantization`, or the error naming the extra to install."""
    try:
        from torchao import quantization
    except ImportError as err:
        raise QuantizationError("quantization needs torchao: pip install 'dvlm[quantize]'") from err
    return quantization


def check_runs_here(scheme: str, device: torch.device) -> None:
    """FP8 needs a CUDA device of compute capability >= 8.9; say so before torchao asserts."""
    if scheme != "fp8":
        return
    if device.type != "cuda" or torch.cuda.get_device_capability(device) < FP8_MIN_CAPABILITY:
        raise QuantizationError(f"fp8 needs a CUDA GPU of compute capability >= 8.9 (L4, H100, ...); the model is on "
                                f"{device}. Use int8-dynamic or int8-weight here")


def check_can_quantize(scheme: str, device: torch.device) -> None:
    """Everything that can refuse `scheme` on `device`, checked before any weight is loaded or written."""
    check_scheme(scheme)
    check_runs_here(scheme, device)
    torchao_quantization()


def torchao_config(scheme: str) -> Any:
    return getattr(torchao_quantization(), TORCHAO_CONFIGS[check_scheme(scheme)])()


def kept_in_precision(model: nn.Module, adapter: Any) -> set[int]:
    """ids of the Linear layers left unquantized: the vision encoder's and the output layer."""
    vision = {id(p) for p in adapter.vision_parameters(model)}
    kept = {id(m) for m in model.modules() if isinstance(m, nn.Linear) and id(m.weight) in vision}
    output = model.get_output_embeddings()
    if output is not None:
        kept.add(id(output))
    return kept


def quantize_model(model: nn.Module, adapter: Any, scheme: str) -> nn.Module:
    """Quantize the language side's Linear layers in place with `scheme`; returns the model."""
    check_can_quantize(scheme, next(model.parameters()).device)
    kept = kept_in_precision(model, adapter)
    torchao_quantization().quantize_(
        model, torchao_config(scheme),
        filter_fn=lambda module, name: isinstance(module, nn.Linear) and id(module) not in kept)
    return model


def recipe_of(config: dict[str, Any]) -> str | None:
    """The scheme a checkpoint's config.json asks to be quantized with, if any."""
    recipe = config.get(RECIPE_KEY)
    if recipe is None:
        return None
    if not isinstance(recipe, dict) or "scheme" not in recipe:
        raise QuantizationError(f"config.json: '{RECIPE_KEY}' must be an object with a 'scheme'")
    return check_scheme(recipe["scheme"])


def scheme_to_apply(requested: str | None, config: dict[str, Any]) -> str | None:
    """`load(quantize=...)` against the checkpoint's own recipe: either, or both when equal."""
    saved = recipe_of(config)
    if requested is not None and saved is not None and check_scheme(requested) != saved:
        raise QuantizationError(f"the checkpoint is quantized with {saved}; load its full-precision source to "
                                f"quantize with {requested}")
    return check_scheme(requested) if requested is not None else saved


def check_destination(src: Path, out: Path, overwrite: bool) -> None:
    """Never write over the source, nor over a non-empty directory unless asked to."""
    if out.resolve() == src.resolve():
        raise QuantizationError(f"--out {out} is the source checkpoint; write the quantized model elsewhere")
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise FileExistsError(f"output directory {out} exists and is not empty; pass --overwrite to replace it")


def write_quantized(src: Path, out: Path, scheme: str, *, overwrite: bool = False) -> Path:
    """Copy the checkpoint `src` into `out` (written whole) with `scheme` recorded in config.json."""
    from dvlm.atomic import written_whole
    from dvlm.model.checkpoint_files import read_config

    check_scheme(scheme)
    config = read_config(src)  # clear errors for a missing directory or config.json
    if recipe_of(config) is not None:
        raise QuantizationError(f"{src} is already quantized ({recipe_of(config)}); quantize its source instead")
    check_destination(src, out, overwrite)
    with written_whole(out) as tmp:
        for item in src.iterdir():
            if item.is_file():
                shutil.copy2(item, tmp / item.name)
            elif item.is_dir() and not item.name.startswith("."):
                shutil.copytree(item, tmp / item.name)
        config[RECIPE_KEY] = {"scheme": scheme, "kept": ["vision encoder", "output layer"]}
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out


# -- torchao's import on a machine without CUDA ----------------------------------------------------
class _DropRecord(logging.Filter):
    """Drops the log records whose message template contains `text` (while `when()` holds)."""

    def __init__(self, text: str, when: Any = lambda: True) -> None:
        super().__init__()
        self.text, self.when = text, when

    def filter(self, record: logging.LogRecord) -> bool:
        return not (self.text in str(record.msg) and self.when())


def quiet_torchao_import() -> None:
    """transformers imports torchao whenever it is installed, so with the `quantize` extra every
    `import dvlm` would log, on a machine without CUDA, one failed load per CUDA kernel library
    of torchao's wheel, and torch's deprecation notes for torchao's enum registrations: noise
    above the CLI's one-line errors. Only those records are dropped; torchao's other warnings stay."""
    logging.getLogger("torchao").addFilter(_DropRecord("Failed to load", lambda: not torch.cuda.is_available()))
    logging.getLogger("torch.utils._pytree").addFilter(_DropRecord("is an Enum subclass and is now natively"))
