"""Where a run's metrics go besides metrics.jsonl: TensorBoard (`report_to: tensorboard`).

Rank 0 writes event files under RUN/tensorboard; a resumed run drops the events past its
checkpoint (TensorBoard's `purge_step`), as it drops those lines of metrics.jsonl.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dvlm.config import ConfigError

TENSORBOARD_DIR = "tensorboard"
# The scalars people watch: the loss and its parts, learning rate, gradient norm, throughput and
# the block size (which grows while it is annealed).
SCALARS = ("loss", "diffusion_loss", "ar_loss", "lr", "grad_norm", "tokens_per_second", "block_size",
           "masked_tokens", "skipped")


class NoReport:
    def log(self, record: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoardReport(NoReport):
    def __init__(self, run_dir: Path, start_step: int):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(run_dir / TENSORBOARD_DIR), purge_step=start_step + 1)

    def log(self, record: dict[str, Any]) -> None:
        for name in SCALARS:
            if record.get(name) is not None:
                self.writer.add_scalar(f"train/{name}", record[name], record["step"])

    def close(self) -> None:
        self.writer.close()


def require(report_to: str | None) -> None:
    """Fail before the model loads when the reporting backend is not installed."""
    if report_to == "tensorboard":
        try:
            import tensorboard  # noqa: F401
        except ImportError as err:
            raise ConfigError("report_to=tensorboard needs the tensorboard package: "
                              "pip install 'dvlm[tensorboard]'") from err


def open_report(report_to: str | None, run_dir: Path, start_step: int, main_process: bool) -> NoReport:
    """The report of a run (nothing off rank 0, or when `report_to` is None)."""
    if report_to is None or not main_process:
        return NoReport()
    return TensorBoardReport(run_dir, start_step)
