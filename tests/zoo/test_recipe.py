"""The built-in model recipe runs end to end (a handful of steps), so it cannot rot."""

import json

import dvlm
from dvlm.zoo.recipe import BUILD_INFO, ZooRecipe, build_zoo


def test_zoo_recipe_builds_loadable_ar_and_diffusion_models(tmp_path):
    recipe = ZooRecipe().scaled(0.001)
    assert recipe.ar.max_steps == 4 and recipe.ar.ar_loss and not recipe.dvlm.ar_loss
    lines = []
    paths = build_zoo(tmp_path / "zoo", recipe, progress=False, log=lines.append)
    assert set(paths) == {"tiny-ar", "tiny-dvlm"}
    ar, dv = dvlm.load(paths["tiny-ar"]), dvlm.load(paths["tiny-dvlm"])
    assert ar.diffusion is None
    assert dv.diffusion.preset == "fast-dvlm" and dv.diffusion.block_size == recipe.block_size
    info = json.loads((paths["tiny-dvlm"] / BUILD_INFO).read_text())
    assert info["stage"] == "dvlm" and info["recipe"]["dvlm"]["max_steps"] == recipe.dvlm.max_steps
    assert any("verified" in line for line in lines)  # the conversion checked itself
    out = dv.generate("Read the digits.", max_new_tokens=4, decoder="spec")
    assert out.nfe >= 1
