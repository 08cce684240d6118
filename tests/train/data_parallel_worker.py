"""One process of the two-process training test (tests/train/test_data_parallel.py).

The test starts two of these with the environment torchrun would give them (RANK, WORLD_SIZE,
MASTER_ADDR, ...), so each joins the same gloo group through accelerate as under `accelerate
launch`, without the launcher's own start-up. Each trains, in order, every run of the JSON file
named on its command line: [{"model", "data", "out", "config", "diffusion"}, ...].
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from dvlm.config import TrainConfig
from dvlm.train.loop import train


def main(runs_file: str) -> None:
    for run in json.loads(Path(runs_file).read_text()):
        train(run["model"], run["data"], run["out"], TrainConfig(**run["config"]),
              diffusion_overrides=run["diffusion"], progress=False, device="cpu")


if __name__ == "__main__":
    main(sys.argv[1])
