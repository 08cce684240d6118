"""The built-in model recipe runs end to end (a handful of steps), so it cannot rot."""

import json

import dvlm
from dvlm.zoo.recipe import BUILD_INFO, STAGE_STAMP, ZooRecipe, build_zoo


def test_zoo_recipe_builds_loadable_ar_and_diffusion_models(tmp_path):
    recipe = ZooRecipe().scaled(0.001)
    assert [c.max_steps for c in recipe.ar_stages] == [6, 4]
    assert all(c.autoregressive for c in recipe.ar_stages) and not recipe.dvlm.autoregressive
    lines = []
    paths = build_zoo(tmp_path / "zoo", recipe, progress=False, log=lines.append)
    assert set(paths) == {"tiny-ar", "tiny-dvlm"}
    ar, dv = dvlm.load(paths["tiny-ar"]), dvlm.load(paths["tiny-dvlm"])
    assert ar.diffusion is None
    assert dv.diffusion.preset == "fast-dvlm" and dv.diffusion.block_size == recipe.block_size
    info = json.loads((paths["tiny-dvlm"] / BUILD_INFO).read_text())
    assert info["stage"] == "dvlm" and info["recipe"]["dvlm"]["max_steps"] == recipe.dvlm.max_steps
    assert dv.diffusion.fill_last_block is recipe.diffusion_overrides["fill_last_block"]
    ar_info = json.loads((paths["tiny-ar"] / BUILD_INFO).read_text())
    assert isinstance(ar_info["final_loss"], float) and ar_info["train_seconds"] >= 0
    assert not list(paths["tiny-ar"].glob(STAGE_STAMP))  # build bookkeeping is not shipped
    assert any("verified" in line for line in lines)  # the conversion checked itself
    out = dv.generate("Read the digits.", max_new_tokens=4, decoder="spec")
    assert out.nfe >= 1
    card = (paths["tiny-dvlm"] / "README.md").read_text()
    assert "## Test-split results (greedy)" in card and "| digits-read | spec" in card

    # A second build with the same recipe and work dir reuses the finished stages.
    again = []
    build_zoo(tmp_path / "zoo", recipe, progress=False, log=again.append)
    assert sum("already done" in line for line in again) == 2 + len(recipe.ar_stages)
