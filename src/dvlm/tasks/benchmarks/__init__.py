"""Published VLM benchmarks read from local files and scored by their official rules.

`BENCHMARKS` maps a name to its `Benchmark` (reader, prompt, scorer, aggregation). Nothing is
downloaded: users point `--data` at the files they have (the official release or the Hugging
Face parquet that lmms-eval downloads). `dvlm.eval.benchmark` runs a model over them.
"""

from __future__ import annotations

from dvlm.tasks.benchmarks.ai2d import AI2D
from dvlm.tasks.benchmarks.chartqa import CHARTQA
from dvlm.tasks.benchmarks.docvqa import DOCVQA
from dvlm.tasks.benchmarks.gqa import GQA
from dvlm.tasks.benchmarks.items import Benchmark, BenchmarkDataError, Item
from dvlm.tasks.benchmarks.mmbench import MMBENCH
from dvlm.tasks.benchmarks.mme import MME
from dvlm.tasks.benchmarks.mmmu import MMMU
from dvlm.tasks.benchmarks.mmmu_pro import MMMU_PRO_STANDARD, MMMU_PRO_VISION
from dvlm.tasks.benchmarks.pope import POPE
from dvlm.tasks.benchmarks.realworldqa import REALWORLDQA
from dvlm.tasks.benchmarks.seedbench_2_plus import SEEDBENCH_2_PLUS
from dvlm.tasks.benchmarks.textvqa import TEXTVQA

BENCHMARKS: dict[str, Benchmark] = {b.name: b for b in (MME, POPE, AI2D, CHARTQA, DOCVQA, TEXTVQA, MMMU)}
# The rest of Fast-dVLM's table, added after the seven above.
BENCHMARKS.update({b.name: b for b in (GQA, MMBENCH, REALWORLDQA, SEEDBENCH_2_PLUS, MMMU_PRO_STANDARD,
                                        MMMU_PRO_VISION)})


def get_benchmark(name: str) -> Benchmark:
    if name not in BENCHMARKS:
        raise BenchmarkDataError(f"unknown benchmark {name!r}; choose one of {', '.join(BENCHMARKS)}")
    return BENCHMARKS[name]


__all__ = ["BENCHMARKS", "Benchmark", "BenchmarkDataError", "Item", "get_benchmark"]
