"""The package map (DESIGN.md §3, STYLE.md principles 1, 15, 16), read from the source with `ast`.

* The packages import one another without cycles, and only down the pipeline: `LAYERS` lists
  them bottom to top, and a package may import only packages of lower layers. Imports inside
  functions count: a lazy import is a dependency too.
* No family name appears outside `model/adapters/`: shared code asks the adapter.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src" / "dvlm"

LAYERS = (
    {"config", "runtime", "atomic"},  # settings, device/dtype/seeding, atomic writes: no dvlm imports
    {"data"},  # images, chats, encoding, collation: what a family's adapter plugs into
    {"model"},  # adapters (one module per family), masks, KV cache, a loaded checkpoint
    {"diffusion"},  # schedule, noising, the two-stream objective
    {"convert"},  # AR checkpoint -> dVLM checkpoint, verified
    {"decode"},  # step-wise decoders and the one generate path
    {"train"},  # the training loop and its resumable checkpoints
    {"tasks"},  # built-in tasks and their metrics
    {"eval"},  # harness, bench, plots
    {"serve"},  # the OpenAI-compatible server and its engine
    {"zoo"},  # the built-in models: recipe, weights, cards, demo
    {"api"},  # the facade users touch: dvlm.load, DVLM
    {"dvlm"},  # the package root re-exports the facade
    {"plugins"},  # other tools' plugins (lmms-eval's model), built on the facade
    {"cli"},  # the command line
    {"__main__"},  # `python -m dvlm`
)
RANK = {name: rank for rank, layer in enumerate(LAYERS) for name in layer}


def package_of(module: str) -> str:
    """'dvlm.decode.block' -> 'decode', 'dvlm.api' -> 'api', 'dvlm' -> 'dvlm'."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "dvlm"


def module_name(path: Path) -> str:
    parts = ["dvlm", *path.relative_to(SRC).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def dvlm_imports(path: Path) -> set[str]:
    """Every dvlm module a source file imports, at the top or inside a function."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return {name for name in found if name == "dvlm" or name.startswith("dvlm.")}


def package_edges() -> dict[tuple[str, str], list[str]]:
    """(importer package, imported package) -> the modules that import across it."""
    edges: dict[tuple[str, str], list[str]] = {}
    for path in sorted(SRC.rglob("*.py")):
        importer = module_name(path)
        for imported in dvlm_imports(path):
            edge = (package_of(importer), package_of(imported))
            if edge[0] != edge[1]:
                edges.setdefault(edge, []).append(f"{importer} -> {imported}")
    return edges


def find_cycle(edges) -> list[str] | None:
    graph: dict[str, set[str]] = {}
    for a, b in edges:
        graph.setdefault(a, set()).add(b)
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt]
            if nxt not in state and (cycle := visit(nxt, path + [nxt])):
                return cycle
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start, [start])):
            return cycle
    return None


def test_every_package_has_a_layer():
    packages = {package_of(module_name(p)) for p in SRC.rglob("*.py")}
    assert packages - set(RANK) == set(), "add the new package to LAYERS, at the place it takes in the pipeline"


def test_packages_import_without_cycles():
    cycle = find_cycle(package_edges())
    assert cycle is None, f"import cycle between packages: {' -> '.join(cycle)}"


def test_imports_point_down_the_pipeline():
    upward = [f"{a} ({RANK[a]}) imports {b} ({RANK[b]}): {', '.join(modules)}"
              for (a, b), modules in sorted(package_edges().items()) if RANK[b] >= RANK[a]]
    assert upward == []


def test_the_checks_can_fail():
    assert find_cycle({("a", "b"): [], ("b", "c"): [], ("c", "a"): []}) == ["a", "b", "c", "a"]
    assert find_cycle({("a", "b"): [], ("a", "c"): [], ("b", "c"): []}) is None
    assert package_of("dvlm.decode.block") == "decode" and package_of("dvlm") == "dvlm"
    assert module_name(SRC / "model" / "adapters" / "__init__.py") == "dvlm.model.adapters"


# "LLaVA" alone also names a training-data format (LLaVA JSON records with `<image>` placeholders),
# which every family trains on: only LLaVA *model* names count as a family here.
FAMILY_NAMES = re.compile(
    r"qwen|llava[-_ ]?(onevision|next|style|1\.5)|llava\w*for|siglip|m-?rope|"
    r"im_start|im_end|vision_start|vision_end|image_pad|video_pad|endoftext",
    re.IGNORECASE)
ADAPTERS = SRC / "model" / "adapters"


def family_mentions(path: Path) -> list[str]:
    return [f"{path.relative_to(SRC)}:{number}: {line.strip()}"
            for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1)
            if FAMILY_NAMES.search(line)]


def test_no_family_name_outside_the_adapters():
    """Shared code talks to the adapter interface only (STYLE.md principle 16)."""
    found = [hit for path in sorted(SRC.rglob("*.py")) if ADAPTERS not in path.parents
             for hit in family_mentions(path)]
    assert found == []


@pytest.mark.parametrize("line", ["rope_delta of M-RoPE", "<|im_start|>user", "Qwen2_5_VLConfig",
                                  "LlavaOnevisionForConditionalGeneration", "mrope_section", "LLaVA-OneVision",
                                  "LLaVA-style models", "a SigLIP tower", "LlavaForConditionalGeneration"])
def test_the_family_pattern_finds_family_names(line):
    assert FAMILY_NAMES.search(line)


@pytest.mark.parametrize("line", ["LLaVA-format training data", "class LlavaJsonDataset(Dataset):",
                                  "export_llava(samples, out)", "a LLaVA record"])
def test_the_family_pattern_leaves_the_data_format_alone(line):
    assert FAMILY_NAMES.search(line) is None
