"""PreallocatedLayer behaves exactly like transformers' DynamicLayer (the decoders' equivalence
with the uncached reference is tested with it in tests/decode)."""

import torch
from transformers.cache_utils import DynamicLayer

import dvlm
from dvlm.model.cache import KVContext, PreallocatedLayer


def _states(gen, rows, length):
    return torch.randn(rows, 2, length, 8, generator=gen), torch.randn(rows, 2, length, 8, generator=gen)


def test_preallocated_layer_matches_dynamic_layer_through_growth_crop_and_row_selection():
    gen = torch.Generator().manual_seed(0)
    dynamic, static = DynamicLayer(), PreallocatedLayer(capacity=4)  # small: it must grow twice
    ops = [("update", 3), ("update", 5), ("crop", -2), ("update", 1), ("select", [0, 2]), ("update", 7),
           ("crop", 0), ("crop", -4), ("update", 2)]
    rows = 3
    for op, arg in ops:
        if op == "update":
            k, v = _states(gen, rows, arg)
            out_d, out_s = dynamic.update(k, v), static.update(k.clone(), v.clone())
            assert torch.equal(out_d[0], out_s[0]) and torch.equal(out_d[1], out_s[1])
        elif op == "crop":
            dynamic.crop(arg)
            static.crop(arg)
        else:
            index = torch.tensor(arg)
            dynamic.batch_select_indices(index)
            static.batch_select_indices(index)
            rows = len(arg)
        assert static.get_seq_length() == dynamic.get_seq_length()
        assert torch.equal(static.keys, dynamic.keys) and torch.equal(static.values, dynamic.values)
    assert static.key_buffer.shape[-2] >= 16  # grew from 4 by doubling


def test_kv_context_preallocates_unless_told_not_to(fast_checkpoint):
    lm = dvlm.load(fast_checkpoint)
    adapter, model = lm.adapter, lm.model
    assert all(isinstance(layer, PreallocatedLayer)
               for layer in KVContext(adapter, model, 1, torch.device("cpu")).cache.layers)
    assert not any(isinstance(layer, PreallocatedLayer)
                   for layer in KVContext(adapter, model, 1, torch.device("cpu"), capacity=None).cache.layers)
