"""LLaVA-OneVision specifics: the image-token count computed from sizes equals what the model's
feature packing produces (tiled, shrunk and multi-image images), the chat layout is the tokenizer's
chat template, the checkpoint's config decides the count, and the vision parameters are the tower."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
    LlavaOnevisionImageProcessorPil,
)

from dvlm.data.processor import IGNORE_INDEX, ChatProcessor
from dvlm.model.adapters.anyres import TileFeatures, capped_grid, max_tiles, unpadded_grid
from dvlm.model.adapters.base import TinyShape
from dvlm.model.adapters.llava_onevision import (
    SIGLIP_PATCH_SIZE,
    TINY_PINPOINTS,
    TINY_TILE,
    LlavaOnevisionAdapter,
    tiny_config,
)
from dvlm.zoo.tiny import build_random_checkpoint
from dvlm.zoo.tokenizer import build_tokenizer

ADAPTER = LlavaOnevisionAdapter()
SIZES = [(56, 56), (28, 28), (20, 90), (90, 20), (40, 56), (48, 56), (13, 100), (150, 200), (111, 37)]
"""(height, width) of test images: square, one tile, wide, tall, letterboxed, odd, large."""
RELEASED_PINPOINTS = [tuple(p) for p in LlavaOnevisionImageProcessorPil.image_grid_pinpoints]
"""The released image processor's tilings: 384 px tiles, 1×1 up to 6×6."""


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(adapter=ADAPTER)


def build_model(tokenizer, tile: int = TINY_TILE, patch: int = SIGLIP_PATCH_SIZE,
                pinpoints=TINY_PINPOINTS, aspect: str = "anyres_max_9"):
    """A tiny model with its own tiling (a small tower: counting is what is tested)."""
    config = tiny_config(tokenizer, TinyShape(vision_hidden_size=16, vision_depth=1, num_layers=1))
    config.vision_config.image_size, config.vision_config.patch_size = tile, patch
    config.image_grid_pinpoints, config.vision_aspect_ratio = [list(p) for p in pinpoints], aspect
    torch.manual_seed(0)
    return type(ADAPTER.random_model(tokenizer, TinyShape()))(config).eval()


def image_of(height: int, width: int) -> Image.Image:
    return Image.new("RGB", (width, height), (120, 30, 200))


def packed_lengths(model, vision) -> list[int]:
    """Tokens per image as the model's own feature packing produces them."""
    with torch.no_grad():
        features = model.model.get_image_features(vision["pixel_values"], vision["image_sizes"],
                                                  batch_num_images=vision["batch_num_images"]).pooler_output
    return [f.shape[0] for f in features]


def chat_format(model, tokenizer):
    config = model.config
    image_processor = ADAPTER.tiny_image_processor(0, 0)
    image_processor.size = {"height": config.vision_config.image_size, "width": config.vision_config.image_size}
    image_processor.image_grid_pinpoints = config.image_grid_pinpoints
    features = TileFeatures.from_image_processor(image_processor, config.vision_config.patch_size,
                                                 config.vision_aspect_ratio)
    return ADAPTER.chat_format(tokenizer, image_processor, features=features)


# The tiny models' tiling; the same with a cap of one tile (most grids shrink); 45 px tiles of 14 px
# patches (3×3 features, 3 px unread, as SigLIP's 384 px tiles leave 6; odd sides: letterbox
# padding leaves a row) on up to 3×3 tiles, capped at 2 tiles' worth.
TILINGS = {
    "released": dict(tile=384, pinpoints=RELEASED_PINPOINTS, scale=8),  # the real geometry, a tiny tower
    "tiny": {},
    "capped": dict(aspect="anyres_max_1"),
    "odd": dict(tile=45, pinpoints=[(r * 45, c * 45) for r in (1, 2, 3) for c in (1, 2, 3)], aspect="anyres_max_2"),
}


@pytest.mark.parametrize("tiling", TILINGS)
def test_image_token_count_equals_the_models_packing(tokenizer, tiling):
    settings = dict(TILINGS[tiling])
    scale = settings.pop("scale", 1)
    model = build_model(tokenizer, **settings)
    fmt = chat_format(model, tokenizer)
    counts = []
    for height, width in SIZES:
        vision, tokens = fmt.process_images([image_of(scale * height, scale * width)])
        assert tokens == packed_lengths(model, vision), (height, width)
        counts += tokens
    assert len(set(counts)) > 3  # the sizes really give different layouts


def test_the_cap_really_shrinks_grids(tokenizer):
    """Same images, a cap of one tile: fewer tokens for the multi-tile images, the same for one tile."""
    free = chat_format(build_model(tokenizer), tokenizer)
    capped = chat_format(build_model(tokenizer, aspect="anyres_max_1"), tokenizer)
    assert capped.process_images([image_of(56, 56)])[1] < free.process_images([image_of(56, 56)])[1]
    assert capped.process_images([image_of(28, 28)])[1] == free.process_images([image_of(28, 28)])[1]


def test_images_sharing_a_sample_are_one_tile_each(tokenizer):
    """LLaVA-OneVision's multi-image layout: no tiling, s² features and a newline per image."""
    model = build_model(tokenizer)
    fmt = chat_format(model, tokenizer)
    vision, tokens = fmt.process_images([image_of(56, 56), image_of(20, 90), image_of(111, 37)])
    side = TINY_TILE // SIGLIP_PATCH_SIZE
    assert tokens == [side * side + 1] * 3 == packed_lengths(model, vision)
    assert vision["pixel_values"].shape[0] == 3 and vision["batch_num_images"].tolist() == [3]


def test_samples_of_a_batch_keep_their_tiling(tokenizer):
    """A one-image sample (tiled) and a two-image sample (untiled) in one batch: the model packs
    each as it was counted."""
    model = build_model(tokenizer)
    fmt = chat_format(model, tokenizer)
    first, second = fmt.process_images([image_of(56, 56)]), fmt.process_images([image_of(28, 56), image_of(40, 40)])
    batch = type(first[0]).concat([first[0], second[0]])
    assert packed_lengths(model, batch) == first[1] + second[1]
    assert first[1][0] > second[1][0]


def test_grid_arithmetic_examples():
    """The docstrings' examples, literally."""
    assert unpadded_grid(40, 56, 4, 4) == (2, 4) and unpadded_grid(48, 56, 4, 4) == (4, 4)
    assert unpadded_grid(56, 40, 4, 4) == (4, 2) and unpadded_grid(56, 28, 4, 2) == (4, 2)
    assert capped_grid(4, 4, 36) == (4, 4) and capped_grid(4, 4, 4) == (2, 2) and capped_grid(8, 4, 4) == (2, 1)
    assert capped_grid(5, 4, 18) == (5, 4)  # 1.05 times too large per side: within the 1.1 margin
    features = TileFeatures(TINY_TILE, SIGLIP_PATCH_SIZE, 9, TINY_PINPOINTS)
    assert features.tokens(56, 28) == 16 and features.tokens(40, 56) == 14 and features.tiles(40, 56) == 5
    assert max_tiles("anyres_max_9") == 9
    with pytest.raises(ValueError, match="anyres_max_N"):
        max_tiles("pad")
    with pytest.raises(ValueError, match="multiple of the tile size"):
        TileFeatures(28, 14, 9, ((28, 30),))
    assert TileFeatures(384, 14, 9, ((384, 768),)).side == 27  # the released models' 729 features a tile


def test_chat_layout_is_the_tokenizers_chat_template(tokenizer):
    """The layout rebuilt token by token == the tokenizer's own chat template with each <image>
    expanded into its image tokens; only the answers and their <|im_end|> are labelled."""
    processor = ChatProcessor(ADAPTER.chat_format(tokenizer, ADAPTER.tiny_image_processor(0, 0)))
    image, question = image_of(56, 56), {"type": "text", "text": "How many shapes are there?"}
    answer = {"role": "assistant", "content": "There are 3 shapes."}
    messages = [{"role": "user", "content": [{"type": "image"}, question]}, answer]
    encoded = processor.encode([{"role": "user", "content": [{"type": "image", "image": image}, question]}, answer])
    tokens = processor.format.process_images([image])[1][0]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False).replace("<image>", "<image>" * tokens)
    assert rendered.startswith("<|im_start|>user\n<image><image>")
    assert encoded.input_ids.tolist() == tokenizer(rendered, add_special_tokens=False)["input_ids"]
    trained = encoded.input_ids[encoded.labels != IGNORE_INDEX]
    assert tokenizer.decode(trained) == "There are 3 shapes.<|im_end|>"
    assert tokenizer.unk_token_id not in encoded.input_ids.tolist()
    assert encoded.position_ids.tolist() == [list(range(len(encoded)))]  # 1-D over text and image tokens
    assert int(encoded.mm_token_type_ids.sum()) == tokens == 24


def test_the_checkpoints_config_decides_the_count(tmp_path, tokenizer):
    """A checkpoint whose tower has 7 px patches (4×4 features per tile): load_processor reads it
    from config.json, and the counts fit the model's packing through the adapter's seams. A 40×56
    image: 2×2 tiles, an 8×8 grid of which 6 rows are the image, 16 base + 6·(8+1) tokens."""
    model = build_model(tokenizer, patch=7)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    ADAPTER.tiny_image_processor(0, 0).save_pretrained(tmp_path)
    processor = ADAPTER.load_processor(tmp_path)
    encoded = processor.encode("What is this?", [image_of(40, 56)])
    assert int(encoded.mm_token_type_ids.sum()) == packed_lengths(model, encoded.vision)[0] == 4 * 4 + 6 * (8 + 1)
    with torch.no_grad():  # the adapter's embed checks the count against the features too
        ADAPTER.embed(model, encoded.input_ids[None], encoded.vision)


def test_a_processor_disagreeing_with_the_model_is_refused(tmp_path, tokenizer):
    build_random_checkpoint(tmp_path, tokenizer, TinyShape(vision_depth=1, num_layers=1), adapter=ADAPTER)
    other = ADAPTER.tiny_image_processor(0, 0)
    other.image_grid_pinpoints = [[28, 28], [56, 56]]
    other.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="differ from the model's"):
        ADAPTER.load_processor(tmp_path)


def test_vision_parameters_are_the_siglip_tower_only(tokenizer):
    """The tower has its own learning rate; the projector and image_newline train with the LM
    (and a fresh projector on a plain LM, issue #11's route, is not part of the tower)."""
    model = build_model(tokenizer)
    vision = {id(p) for p in ADAPTER.vision_parameters(model)}
    tower = {id(p) for p in model.model.vision_tower.parameters()}
    rest = {id(p) for name, p in model.named_parameters() if not name.startswith("model.vision_tower.")}
    assert vision == tower and len(vision) > 0 and not vision & rest
    assert id(model.model.image_newline) in rest
    assert {id(p) for p in model.model.multi_modal_projector.parameters()} <= rest


def test_tiny_config_ids_come_from_the_tokenizer(tokenizer):
    config = tiny_config(tokenizer, TinyShape())
    vocab = tokenizer.get_vocab()
    assert (config.image_token_id, config.video_token_id) == (vocab["<image>"], vocab["<video>"])
    assert config.text_config.eos_token_id == vocab["<|im_end|>"] and config.text_config.vocab_size == len(tokenizer)
