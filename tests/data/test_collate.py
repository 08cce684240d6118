import pytest
import torch
from PIL import Image

from dvlm.data.collate import Batch, collate
from dvlm.data.processor import IGNORE_INDEX, Encoded
from dvlm.data.vision import VisionInputs

P = 99  # pad id of these literal tests (ids here are arbitrary test data, not a vocabulary)
X = IGNORE_INDEX


def sample(ids, labels, types=None, delta=0, patches=None, grid=None) -> Encoded:
    n = len(ids)
    positions = torch.arange(n).expand(3, n) + 10  # recognisable, not the padding value
    vision = None if patches is None else VisionInputs({"pixel_values": patches, "image_grid_thw": grid})
    return Encoded(torch.tensor(ids), torch.tensor(labels),
                   torch.tensor(types or [0] * n), positions.clone(), n + delta, vision)


def test_right_padding_literal():
    batch = collate([sample([1, 2, 3], [X, 2, 3], delta=-1), sample([4], [4])], pad_token_id=P)
    assert batch.input_ids.tolist() == [[1, 2, 3], [4, P, P]]
    assert batch.labels.tolist() == [[X, 2, 3], [4, X, X]]
    assert batch.attention_mask.tolist() == [[True, True, True], [True, False, False]]
    assert batch.attention_mask.dtype == torch.bool
    assert batch.position_ids.shape == (3, 2, 3)
    assert batch.position_ids[1].tolist() == [[10, 11, 12], [10, 0, 0]]
    assert batch.next_positions.tolist() == [3 - 1, 1 + 0] and batch.next_positions.dtype == torch.long
    assert batch.vision is None
    assert len(batch) == 2


def test_left_padding_literal():
    batch = collate([sample([1, 2, 3], [X, 2, 3]), sample([4], [4], types=[1])],
                    pad_token_id=P, padding_side="left")
    assert batch.input_ids.tolist() == [[1, 2, 3], [P, P, 4]]
    assert batch.labels.tolist() == [[X, 2, 3], [X, X, 4]]
    assert batch.attention_mask.tolist() == [[True, True, True], [False, False, True]]
    assert batch.mm_token_type_ids.tolist() == [[0, 0, 0], [0, 0, 1]]
    assert batch.position_ids[0].tolist() == [[10, 11, 12], [0, 0, 10]]


def test_images_are_concatenated_in_sample_order():
    a = torch.ones(4, 6)
    b = torch.full((8, 6), 2.0)
    batch = collate([sample([1], [1], patches=a, grid=torch.tensor([[1, 2, 2]])),
                     sample([2], [2]),
                     sample([3], [3], patches=b, grid=torch.tensor([[1, 2, 4]]))], pad_token_id=P)
    assert batch.vision["pixel_values"].shape == (12, 6)
    assert batch.vision["pixel_values"][:4].eq(1).all() and batch.vision["pixel_values"][4:].eq(2).all()
    assert batch.vision["image_grid_thw"].tolist() == [[1, 2, 2], [1, 2, 4]]


def test_invalid_arguments():
    with pytest.raises(ValueError, match="padding_side must be one of"):
        collate([sample([1], [1])], pad_token_id=P, padding_side="middle")
    with pytest.raises(ValueError, match="empty list"):
        collate([], pad_token_id=P)


def test_to_moves_every_tensor_and_keeps_dtypes():
    batch = collate([sample([1, 2], [1, 2], patches=torch.ones(4, 6),
                            grid=torch.tensor([[1, 2, 2]]))], pad_token_id=P)
    moved = batch.to("cpu")
    assert isinstance(moved, Batch) and moved is not batch
    assert moved.input_ids.dtype == torch.long and moved.attention_mask.dtype == torch.bool
    assert torch.equal(moved.vision["pixel_values"], batch.vision["pixel_values"])
    assert collate([sample([1], [1])], pad_token_id=P).to("cpu").vision is None


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_batch_positions_match_get_rope_index_with_attention_mask(processor, tiny_vlm,
                                                                  padding_side):
    samples = [
        processor.encode("What is this?", images=[Image.new("RGB", (112, 56))]),
        processor.encode("Yes"),
        processor.encode("<image> and <image>", images=[Image.new("RGB", (56, 56)),
                                                        Image.new("RGB", (84, 112))]),
    ]
    batch = collate(samples, processor.pad_token_id, padding_side)
    expected, deltas = tiny_vlm.model.get_rope_index(
        batch.input_ids, mm_token_type_ids=batch.mm_token_type_ids,
        image_grid_thw=batch.vision["image_grid_thw"], attention_mask=batch.attention_mask)
    assert torch.equal(batch.position_ids, expected)
    assert batch.next_positions.tolist() == (batch.attention_mask.sum(dim=1) + deltas[:, 0]).tolist()
    assert batch.vision["image_grid_thw"].shape == (3, 3)


def test_batch_runs_through_the_tiny_model(processor, tiny_vlm):
    samples = [processor.encode("What is this?", images=[Image.new("RGB", (56, 84))]),
               processor.encode([{"role": "user", "content": "Yes"},
                                 {"role": "assistant", "content": "No"}])]
    batch = collate(samples, processor.pad_token_id)
    with torch.no_grad():
        out = tiny_vlm(input_ids=batch.input_ids, attention_mask=batch.attention_mask.long(),
                       position_ids=batch.position_ids, pixel_values=batch.vision["pixel_values"],
                       image_grid_thw=batch.vision["image_grid_thw"],
                       mm_token_type_ids=batch.mm_token_type_ids, labels=batch.labels)
    assert out.logits.shape == (*batch.input_ids.shape, tiny_vlm.config.text_config.vocab_size)
    assert torch.isfinite(out.loss)
