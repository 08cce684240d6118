"""The compiled decode path (`DecodeConfig.compile`, `--compile`): the forward of every decoding
step runs under `torch.compile` with static shapes.

Eager decoding gives every forward new shapes: the cache grows by a block, blocks differ in width.
Here keys and values live in buffers of a fixed capacity per row (`StaticLayer`: a power of two,
at least `STATIC_CAPACITY` entries, doubled when outgrown); a forward writes its new entries in
place and attends to the whole buffer, the entries past the context masked out; and its Q new
tokens are padded to a bucket (`query_bucket`: 1, else a power of two of at least `MIN_BUCKET`),
their padding masked out too. A step's forward so has one of a few shapes (rows, bucket,
capacity), each compiled once (`CompiledForward`) and replayed after. On CUDA the compiled
forward runs as CUDA graphs (mode="reduce-overhead"); on CPU as Inductor's C++ kernels.

The first calls of a shape compile it (seconds for the built-in model, a minute or more for a
real one): `CompiledForward.warmup_s` counts them and `run_to_completion` leaves them out of the
rows' times (tokens/s), reporting them as the `compile_s` timing.

A short prefill runs compiled too (its prompt padded to a bucket), a long one (an image prompt of
a real model) eagerly; the vision encoder, the logits and everything around the forward run eagerly. Tokens equal eager decoding in float32: masked entries weigh exactly 0, and only the
order of the sums differs (logits move by ~1e-6).
"""

from __future__ import annotations

import time
import weakref
from typing import Any

import torch
from torch import nn

from dvlm.model.adapters.base import Adapter
from dvlm.model.cache import KVContext, PreallocatedLayer, preallocate
from dvlm.model.masks import to_additive
from dvlm.runtime import synchronize

MIN_BUCKET = 8
"""Smallest padded width of a multi-token forward: truncated blocks (2..8 tokens) share one shape."""
RECOMPILE_LIMIT = 64
"""torch._dynamo's limit on compiled shapes per function (its default, 8, is below the buckets a
server with changing batch sizes needs)."""
MAX_COMPILED_QUERY = 256
"""Forwards of more new tokens (long prompts: an image is 256 tokens and up) run eagerly: they are
compute-bound, so compiling them saves little, and every prompt-length bucket would be one more
compile (minutes for a 3B model on a CPU). Short prompts (the built-in tasks') are compiled."""
CPP_WRAPPER_MAX_PARAMETERS = 200_000_000
"""On CPU, models up to this size compile with Inductor's C++ wrapper: the code that calls the
kernels is C++ too. A small model's forward is mostly those calls (2.5x faster than eager on the
built-in model, against 1.9x with Python calling them); a large model's is arithmetic, and the
C++ wrapper doubles its compile time. Never `freezing` (weights folded in as constants): a copy of
the weights, and a model changed after compiling would silently decode with the old ones."""
CUDA_WARMUP_CALLS = 3
"""Calls of a new shape that count as warm-up on CUDA (cudagraph trees record on a later call)."""


def query_bucket(length: int) -> int:
    """The padded width of a forward of `length` new tokens: 1 stays 1 (an AR step), others go to
    the next power of two, at least MIN_BUCKET.

    >>> [query_bucket(n) for n in (1, 2, 8, 9, 16, 17, 272)]
    [1, 8, 8, 16, 16, 32, 512]
    """
    if length == 1:
        return 1
    return max(MIN_BUCKET, 1 << (length - 1).bit_length())


STATIC_CAPACITY = 256
"""Smallest buffer (entries per row) of the compiled path: every forward attends to the whole
buffer, so it starts small (a prompt with an image is a few hundred entries) and doubles."""


def static_capacity(entries: int) -> int:
    """Buffer entries per row for a context of `entries`: a power of two, at least STATIC_CAPACITY."""
    return max(STATIC_CAPACITY, 1 << max(entries - 1, 0).bit_length())


class StaticLayer(PreallocatedLayer):
    """A PreallocatedLayer whose buffers keep a static shape (R, H, capacity, hd): zero-filled
    (finite, since masked entries still enter the attention product with weight 0), a power of two
    long, compacted in place of dropping their leading entries. On CUDA their addresses are marked
    static for CUDA graphs (a new buffer, after rows join or leave, records its graphs anew)."""

    def __init__(self, capacity: int) -> None:
        super().__init__(static_capacity(capacity))

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.allocate(key_states.shape[0], key_states.shape[1], key_states.shape[3], key_states.dtype,
                      key_states.device)

    def allocate(self, rows: int, heads: int, head_dim: int, dtype: torch.dtype, device: torch.device) -> None:
        """Buffers for `rows` rows, before any forward (so the first, the prefill, is compiled too)."""
        self.dtype, self.device = dtype, device
        self.key_buffer = torch.zeros(rows, heads, self.capacity, head_dim, dtype=dtype, device=device)
        self.value_buffer = torch.zeros_like(self.key_buffer)
        self.is_initialized = True
        self._fresh_buffers()

    def reserve(self, entries: int) -> None:
        """Make room for `entries` per row (a larger power of two: a new shape to compile)."""
        if entries > self.key_buffer.shape[-2]:
            self._grow(entries)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        if self.is_initialized:
            self._fresh_buffers()

    def drop_leading(self, count: int) -> None:
        if self.is_initialized and count:
            kept = self.length - count
            for name in ("key_buffer", "value_buffer"):
                old = getattr(self, name)
                new = torch.zeros_like(old)
                new[..., :kept, :] = old[..., count:self.length, :]
                setattr(self, name, new)
            self.length = kept
            self._fresh_buffers()

    def _grow(self, size: int) -> None:
        size = static_capacity(size)
        for name in ("key_buffer", "value_buffer"):
            old = getattr(self, name)
            new = old.new_zeros(*old.shape[:2], size, old.shape[3])
            new[..., :self.length, :] = old[..., :self.length, :]
            setattr(self, name, new)
        self._fresh_buffers()

    def _fresh_buffers(self) -> None:
        if self.key_buffer.device.type == "cuda":
            torch._dynamo.mark_static_address(self.key_buffer)
            torch._dynamo.mark_static_address(self.value_buffer)
        self._views()


class _Buffers:
    """The cache a compiled forward sees: every layer's static buffers, written at `index`.

    Built inside the compiled function from plain tensors, so that compiled code depends on shapes
    only, never on a context object. It offers what the families' attention calls (`update`)."""

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], index: torch.Tensor) -> None:
        self.keys, self.values, self.index = keys, values, index

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        self.keys[layer_idx].index_copy_(2, self.index, key_states)
        self.values[layer_idx].index_copy_(2, self.index, value_states)
        return self.keys[layer_idx], self.values[layer_idx]


class CompiledForward:
    """The model's step forward under torch.compile, one per model (`compiled_forward`)."""

    def __init__(self, adapter: Adapter, model: nn.Module) -> None:
        self.adapter, self.model = adapter, model
        device = next(model.parameters()).device
        self.cuda = device.type == "cuda"
        raise_recompile_limit()
        small = sum(p.numel() for p in model.parameters()) <= CPP_WRAPPER_MAX_PARAMETERS
        options = {"cpp_wrapper": True} if small and not self.cuda else None
        self._compiled = torch.compile(self._forward, dynamic=False, mode="reduce-overhead" if self.cuda else None,
                                       options=options)
        self.calls: dict[tuple, int] = {}  # shape -> calls so far
        self.warmup_s = 0.0  # seconds spent in the first calls of each shape (compiling, recording)

    @property
    def shapes(self) -> int:
        return len(self.calls)

    def _forward(self, embeds, position_ids, mask, index, keys, values) -> torch.Tensor:
        return self.adapter.hidden_states(self.model, embeds, position_ids, mask, cache=_Buffers(keys, values, index))

    def __call__(self, layers: list[StaticLayer], embeds: torch.Tensor, position_ids: torch.Tensor,
                 mask: torch.Tensor, keep: int, dtype: torch.dtype) -> torch.Tensor:
        """`KVContext._hidden` over static buffers: Q new tokens (R, Q, F) under `mask` (R, Q, T + Q)
        bool, padded to their bucket and to the buffers' capacity; the layers keep the first
        `keep` new entries. Returns (R, Q, D)."""
        rows, q = embeds.shape[:2]
        start, bucket = layers[0].length, query_bucket(q)
        for layer in layers:
            layer.reserve(start + bucket)
        capacity = layers[0].key_buffer.shape[-2]
        full = mask.new_zeros(rows, bucket, capacity)  # padded queries and keys: attended by nothing
        full[:, :q, :start + q] = mask
        index = torch.arange(start, start + bucket, device=embeds.device)
        args = (pad_to(embeds, bucket, dim=1), pad_to(position_ids, bucket, dim=2), to_additive(full, dtype), index,
                [layer.key_buffer for layer in layers], [layer.value_buffer for layer in layers])
        hidden = self._timed((rows, bucket, capacity, embeds.dtype), args)[:, :q]
        for layer in layers:
            layer.length = start + keep
            layer._views()
        return hidden.clone() if self.cuda else hidden  # a CUDA graph's output is overwritten by its next replay

    def _timed(self, shape: tuple, args: tuple) -> torch.Tensor:
        calls = self.calls.get(shape, 0)
        self.calls[shape] = calls + 1
        if self.cuda:
            torch.compiler.cudagraph_mark_step_begin()
        if calls >= (CUDA_WARMUP_CALLS if self.cuda else 1):
            # A compiled shape: of dynamo's guards only those that tell the compiled shapes apart
            # are checked (checking all of them, the whole model's, costs as much as a tiny forward).
            try:
                with torch.compiler.set_stance("default", skip_guard_eval_unsafe=True):
                    return self._compiled(*args)
            except RuntimeError as err:  # something besides the shape changed (grad mode, ...): compile for it
                if "skip_guard_eval_unsafe" not in str(err):
                    raise
        begin = time.perf_counter()
        hidden = self._compiled(*args)
        synchronize(hidden.device)
        self.warmup_s += time.perf_counter() - begin
        return hidden


def pad_to(x: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    """`x` with zeros appended along `dim` up to `width`, contiguous (the compiled code is
    specialised to its inputs' strides as well as their shapes)."""
    missing = width - x.shape[dim]
    if missing == 0:
        return x.contiguous()
    shape = list(x.shape)
    shape[dim] = missing
    return torch.cat([x, x.new_zeros(shape)], dim=dim)


def raise_recompile_limit() -> None:
    config = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(config, name):
            setattr(config, name, max(getattr(config, name), RECOMPILE_LIMIT))


_COMPILED: weakref.WeakKeyDictionary[nn.Module, CompiledForward] = weakref.WeakKeyDictionary()


def compiled_forward(adapter: Adapter, model: nn.Module) -> CompiledForward:
    """The model's compiled step forward, made on first use and shared by every context of it.

    Compiled code assumes the model's modules and weights' types stay as they were (it then only
    checks shapes): after changing them (quantizing, swapping layers), call `forget_compiled`."""
    if model not in _COMPILED:
        _COMPILED[model] = CompiledForward(adapter, model)
    return _COMPILED[model]


def forget_compiled(model: nn.Module) -> None:
    """Drop the model's compiled forward (and torch.compile's caches): the next one compiles anew."""
    _COMPILED.pop(model, None)
    torch._dynamo.reset()


class CompiledKVContext(KVContext):
    """A KVContext whose forwards run through the model's `CompiledForward` over static buffers
    (`StaticLayer`), a short prefill's too (padded to a bucket); forwards of more than
    MAX_COMPILED_QUERY new tokens, and caches whose layers are not all full-attention layers of the
    model's shape, run eagerly (writing the same buffers)."""

    def __init__(self, adapter: Adapter, model: nn.Module, batch_size: int, device: torch.device,
                 capacity: int = STATIC_CAPACITY) -> None:
        super().__init__(adapter, model, batch_size, device, capacity=None)
        preallocate(self.cache, capacity, StaticLayer)
        heads, head_dim = kv_shape(model)
        for layer in self.cache.layers:
            if isinstance(layer, StaticLayer):
                layer.allocate(batch_size, heads, head_dim, self.dtype, device)
        self.compiled = compiled_forward(adapter, model)

    def _hidden(self, embeds, position_ids, mask: torch.Tensor, keep: int) -> torch.Tensor:
        layers = self.cache.layers
        static = all(isinstance(layer, StaticLayer) and layer.is_initialized for layer in layers)
        if not static or embeds.shape[1] > MAX_COMPILED_QUERY:
            return super()._hidden(embeds, position_ids, mask, keep)
        return self.compiled(layers, embeds, position_ids, mask, keep, self.dtype)


def kv_shape(model: nn.Module) -> tuple[int, int]:
    """(key/value heads, head dim) of the language model, from its config (as transformers' own
    static cache reads them)."""
    text = model.config.get_text_config()
    heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    return heads, getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
