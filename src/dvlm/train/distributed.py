"""Data-parallel training on accelerate: one process, or many under `accelerate launch`.

`dvlm train` runs unchanged in one process and under `accelerate launch -m dvlm train ...`
(DDP; FSDP2 and DeepSpeed ZeRO on GPUs). accelerate owns the process group and the wrappers;
this module only says what a data-parallel step needs from them:

* a step's global batch (a pure function of (seed, step)) is split by rank: each global
  micro-batch of `batch_size * world_size` samples gives each process its `batch_size` rows;
* the noise of a global micro-batch is drawn whole on every process and each keeps its own rows
  (`NoiseWindow`), so N processes with batch b see the batches and noise of one with batch N*b;
* the loss is normalised by the step's global count (labelled tokens, or rows) and each process
  backpropagates `world_size` times its share, so the wrappers' gradient mean is the gradient of
  the one-process loss;
* every process runs a forward and backward for each global micro-batch (the wrappers'
  collectives need it): one whose share is empty runs a stand-in sample with weight 0.

In one process nothing is wrapped and no collective runs: the loop is the plain one.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Iterator

import torch
from torch import nn

from dvlm.config import TrainConfig
from dvlm.data.collate import Batch
from dvlm.diffusion.noising import NoiseWindow

# How long a process waits in a collective for the others before the run fails (seconds). A
# rank that dies is noticed at once by the launcher and the gloo/NCCL transport; the timeout
# bounds what they cannot see (a rank stuck alive). Rank 0 writes checkpoints while the others
# wait in a barrier, so it must exceed the time to write one.
COLLECTIVE_TIMEOUT_ENV = "DVLM_COLLECTIVE_TIMEOUT"
DEFAULT_COLLECTIVE_TIMEOUT = 1800


class DistributedError(ValueError):
    """The launch asks for something this run cannot do (e.g. FSDP on CPU processes)."""


class Objective(nn.Module):
    """The model and its training loss as one module.

    The data-parallel wrappers (DDP, FSDP2, DeepSpeed) act when a module's forward is called;
    dvlm's objectives call the model's parts (embed, hidden states, logits) instead of its
    forward, so the wrapped module is this one and its forward is the loss:
    `loss(model, batch, normaliser, stream, clean_block) -> LossOutput`.
    """

    def __init__(self, model: nn.Module, loss: Callable[..., Any]):
        super().__init__()
        self.model, self.loss = model, loss
        # FSDP2's auto-wrap policy reads the root module's layer classes
        self._no_split_modules = getattr(model, "_no_split_modules", None)

    def forward(self, batch: Batch, normaliser: int, stream=None, clean_block=None):
        return self.loss(self.model, batch, normaliser, stream, clean_block)


@dataclass
class MicroStep:
    """One forward/backward of a step on this process."""

    batch: Batch
    index: int
    """Its place among the step's global micro-batches that have rows (it seeds the noise)."""
    window: NoiseWindow | None
    """Where its rows sit in the global micro-batch whose noise is drawn; None for a stand-in."""
    weight: float
    """1, or 0 for a stand-in run only so that the collectives match (its rows belong to no one)."""
    last: bool = False
    """The step's last pass: gradients are reduced over processes after it."""


class SingleProcess:
    """The plain loop: rank 0 of 1, nothing wrapped, no collective."""

    rank, world_size, is_main = 0, 1, True

    def device(self, requested: str | None) -> str | None:
        return requested

    def prepare(self, objective: Objective, optimizer):
        return objective, optimizer

    def gather(self, values: list[int]) -> torch.Tensor:
        """(world_size, len(values)) long: every process's values, by rank."""
        return torch.tensor([values], dtype=torch.long)

    def sum(self, values: list[float]) -> list[float]:
        return values

    def barrier(self) -> None:
        pass

    @contextlib.contextmanager
    def main_first(self) -> Iterator[None]:
        yield

    def no_sync(self, objective) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor, micro: MicroStep) -> None:
        loss.backward()  # one process, weight 1: the loss as it is

    def clip_grad_norm(self, objective: Objective, max_norm: float) -> float:
        return float(torch.nn.utils.clip_grad_norm_(objective.model.parameters(), max_norm))

    def full_state_dict(self, objective: Objective) -> dict[str, torch.Tensor] | None:
        return None  # the model's own state dict is whole

    def optimizer_state(self, objective, optimizer) -> dict[str, Any] | None:
        return optimizer.state_dict()

    def load_optimizer_state(self, objective, optimizer, state: dict[str, Any] | None) -> None:
        if state is None:
            raise DistributedError(NO_OPTIMIZER_STATE)
        optimizer.load_state_dict(state)


class DataParallel(SingleProcess):
    """Many processes under accelerate: DDP (CPU or GPU), FSDP2 or DeepSpeed ZeRO (GPU)."""

    def __init__(self, accelerator, cfg: TrainConfig):
        from accelerate.utils import DistributedType

        self.accelerator, self.cfg = accelerator, cfg
        self.rank, self.world_size = accelerator.process_index, accelerator.num_processes
        self.is_main = accelerator.is_main_process
        self.fsdp = accelerator.distributed_type == DistributedType.FSDP
        self.deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED

    def device(self, requested: str | None) -> str:
        device = self.accelerator.device
        return "cpu" if device.type == "cpu" else str(device)

    def prepare(self, objective: Objective, optimizer):
        if self.deepspeed:  # DeepSpeed wants its batch geometry before it builds its engine
            ds = self.accelerator.state.deepspeed_plugin.deepspeed_config
            ds["train_micro_batch_size_per_gpu"] = self.cfg.batch_size
            ds["gradient_accumulation_steps"] = self.cfg.grad_accum
            ds["train_batch_size"] = self.cfg.batch_size * self.cfg.grad_accum * self.world_size
            ds["gradient_clipping"] = self.cfg.max_grad_norm or 0.0
        # The LR scheduler stays ours: accelerate's steps a scheduler once per process per step.
        return self.accelerator.prepare(objective, optimizer)

    def gather(self, values: list[int]) -> torch.Tensor:
        local = torch.tensor(values, dtype=torch.long, device=self.accelerator.device)
        return self.accelerator.gather(local).view(self.world_size, len(values)).cpu()

    def sum(self, values: list[float]) -> list[float]:
        local = torch.tensor(values, dtype=torch.float64, device=self.accelerator.device)
        return self.accelerator.reduce(local, reduction="sum").cpu().tolist()

    def barrier(self) -> None:
        self.accelerator.wait_for_everyone()

    @contextlib.contextmanager
    def main_first(self) -> Iterator[None]:
        with self.accelerator.main_process_first():
            yield

    def no_sync(self, objective) -> contextlib.AbstractContextManager:
        return self.accelerator.no_sync(objective)

    def backward(self, loss: torch.Tensor, micro: MicroStep) -> None:
        # The wrappers average gradients over processes; the step's loss is their sum.
        scale = micro.weight * self.world_size
        if not self.deepspeed:
            self.accelerator.backward(loss * scale)
            return
        # DeepSpeed divides by its accumulation steps and updates after the step's last micro-batch
        # (a step can have fewer micro-batches than grad_accum: the last of an epoch).
        engine = self.accelerator.deepspeed_engine_wrapped
        engine.backward(loss * (scale * engine.engine.gradient_accumulation_steps()), sync_gradients=micro.last)

    def clip_grad_norm(self, objective: Objective, max_norm: float) -> float | None:
        """The global gradient norm before clipping; DeepSpeed's, from the step it has already
        taken (None before it has one)."""
        norm = self.accelerator.clip_grad_norm_(objective.parameters(), max_norm)
        return None if norm is None else float(norm)

    def full_state_dict(self, objective) -> dict[str, torch.Tensor] | None:
        """The whole model's weights on rank 0 (None elsewhere) when they are sharded (FSDP2,
        ZeRO-3); None when every process holds them whole (DDP, ZeRO-2)."""
        zero3 = self.deepspeed and self.accelerator.state.deepspeed_plugin.zero_stage == 3
        if not (self.fsdp or zero3):
            return None
        state = self.accelerator.get_state_dict(objective)  # a collective: every rank calls it
        prefix = "model."  # the Objective's
        return {k[len(prefix):]: v for k, v in state.items()} if self.is_main else None

    def optimizer_state(self, objective, optimizer) -> dict[str, Any] | None:
        """The optimizer state to checkpoint, in one process's layout (a collective under FSDP2);
        None under DeepSpeed, whose optimizer state stays sharded."""
        if self.deepspeed:
            return None
        if not self.fsdp:
            return optimizer.state_dict()
        return full_optimizer_state(objective, optimizer)

    def load_optimizer_state(self, objective, optimizer, state: dict[str, Any] | None) -> None:
        if self.deepspeed:
            raise DistributedError(DEEPSPEED_RESUME)
        if state is None:
            raise DistributedError(NO_OPTIMIZER_STATE)
        if self.fsdp:
            load_full_optimizer_state(objective, optimizer, state)
        else:
            optimizer.load_state_dict(state)


NO_OPTIMIZER_STATE = ("written under DeepSpeed, without its optimizer state (sharded, not saved): start a new run "
                      "with --model on the checkpoint")
DEEPSPEED_RESUME = ("resuming under DeepSpeed is not supported (dvlm does not save its sharded optimizer state): "
                    "resume under DDP or FSDP2")


class CheckpointedOptimizer:
    """The optimizer as checkpoint.py reads and writes it: its state in one process's layout."""

    def __init__(self, processes: SingleProcess, objective, optimizer, saved: dict[str, Any] | None = None):
        self.processes, self.objective, self.optimizer, self.saved = processes, objective, optimizer, saved

    def state_dict(self) -> dict[str, Any] | None:
        return self.saved  # gathered beforehand: under FSDP2 that is a collective, and only rank 0 writes

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        self.processes.load_optimizer_state(self.objective, self.optimizer, state)


def _parameter_names(objective: nn.Module, optimizer) -> list[str]:
    """The optimizer's parameters' names, in its order (the order of one-process state dicts)."""
    names = {id(p): name for name, p in objective.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def full_optimizer_state(objective: nn.Module, optimizer) -> dict[str, Any]:
    """The whole optimizer state as `optimizer.state_dict()` would give it in one process
    (parameters numbered in order), from parameters sharded or not."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    full = get_optimizer_state_dict(objective, optimizer, options=StateDictOptions(full_state_dict=True,
                                                                                    cpu_offload=True))
    number = {name: i for i, name in enumerate(_parameter_names(objective, optimizer))}
    return {"state": {number[name]: value for name, value in full["state"].items()},
            "param_groups": [{**g, "params": [number[name] for name in g["params"]]} for g in full["param_groups"]]}


def load_full_optimizer_state(objective: nn.Module, optimizer, state: dict[str, Any]) -> None:
    """Put a one-process optimizer state back, sharding it as the parameters are."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    names = _parameter_names(objective, optimizer)
    named = {"state": {names[i]: value for i, value in state["state"].items()},
             "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]]}
    set_optimizer_state_dict(objective, optimizer, named, options=StateDictOptions(full_state_dict=True))


def start(requested_device: str | None, cfg: TrainConfig) -> SingleProcess:
    """The processes of this run: one, or the ones `accelerate launch` (torchrun) started."""
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true"
    sharded = os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true"
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 and not (deepspeed or sharded):
        return SingleProcess()
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, DistributedType, InitProcessGroupKwargs

    timeout = int(os.environ.get(COLLECTIVE_TIMEOUT_ENV, DEFAULT_COLLECTIVE_TIMEOUT))
    cpu = requested_device == "cpu" or not torch.cuda.is_available()
    accelerator = Accelerator(
        cpu=cpu,
        # DeepSpeed's engine counts micro-batches itself; accelerate then divides nothing
        gradient_accumulation_steps=cfg.grad_accum if deepspeed else 1,
        kwargs_handlers=[
            InitProcessGroupKwargs(timeout=timedelta(seconds=timeout)),
            # a micro-batch without images leaves the vision tower without gradients
            DistributedDataParallelKwargs(find_unused_parameters=True),
        ],
    )
    wanted = "DeepSpeed" if deepspeed else "FSDP" if sharded else None
    if wanted and accelerator.distributed_type not in (DistributedType.DEEPSPEED, DistributedType.FSDP):
        raise DistributedError(f"accelerate runs {wanted} on GPUs only; these processes are "
                               f"{accelerator.distributed_type.value}: launch with the DDP config instead")
    return DataParallel(accelerator, cfg)


def plan_micro_steps(processes: SingleProcess, shares: list[Batch | None], extents: torch.Tensor,
                     stand_in: Any) -> list[MicroStep]:
    """This process's forward/backward passes of a step.

    Args:
        shares: this process's rows of each global micro-batch (None: none of its samples loaded).
        extents: (world_size, M, 3) long, every process's (rows, length, blocks) per micro-batch.
        stand_in: called with a micro-batch's index, returns a Batch to run with weight 0.
    A global micro-batch without rows anywhere is left out on every process, like an empty
    micro-batch in one process.
    """
    steps = []
    for micro, share in enumerate(shares):
        rows = extents[:, micro, 0]
        if int(rows.sum()) == 0:
            continue
        window = NoiseWindow(offset=int(rows[:processes.rank].sum()), rows=int(rows.sum()),
                             length=int(extents[:, micro, 1].max()), blocks=int(extents[:, micro, 2].max()))
        if share is None:
            steps.append(MicroStep(stand_in(micro), len(steps), None, 0.0))
        else:
            steps.append(MicroStep(share, len(steps), window, 1.0))
    if steps:
        steps[-1].last = True
    return steps
