"""`dvlm serve` exactly as a user starts it (the real engine, the built-in model), except that each
engine step first spends `DVLM_TEST_STEP_S` seconds inside torch ops, touching the file
`DVLM_TEST_STEP_MARK` when it begins: a long forward, caught in the act by a signal.

    python -m tests.serve.slow_serve serve --port 0 ...     (from the repository root)
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch

from dvlm.cli import main
from dvlm.decode.stepper import Stepper


def slow_step(original):
    def step(self):
        Path(os.environ["DVLM_TEST_STEP_MARK"]).touch()
        end = time.monotonic() + float(os.environ["DVLM_TEST_STEP_S"])
        work = torch.ones(256, 256)
        while time.monotonic() < end:  # the thread spends this time in torch, without the GIL
            work = (work @ work).clamp(-1, 1)
        return original(self)
    return step


if __name__ == "__main__":
    Stepper.step = slow_step(Stepper.step)
    sys.exit(main(sys.argv[1:]))
