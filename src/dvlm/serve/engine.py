"""The serving engine: one loop thread owns the model and batches requests between blocks.

Requests wait in a bounded queue (`QueueFullError` beyond `max_queue`). Each iteration of the loop
1. ends the requests that were cancelled or ran past their timeout (their rows leave at once);
2. admits waiting requests into the group of their settings: requests whose settings cannot share
   a forward (decoder, block size, fixed step count: `group_key`, with the model's defaults
   filled in) run in separate groups; per-row settings (threshold, sampling: temperature, top-k,
   top-p, seed; max_new_tokens, stop) share one. A group holds at most `max_batch_size` rows; the admitted
   requests of a group are prefilled as one small batch, then join its running batch;
3. advances every group by one step (one block; one token for ar), round robin, and hands each
   request its newly committed text as a `Delta`; rows that finish (EOS, max_new_tokens, a stop
   string) leave the batch at once and get their `Finished`.

The groups are the decoders' own steppers (`dvlm.decode.stepper`): the engine runs the step code
`generate` runs, so a request's answer equals `generate` of that request alone (invariant 7).
A failure while serving a group ends that group's requests with finish_reason "error"; the other
groups go on. Nothing but the loop thread calls the model.

The engine's `caches` (`dvlm.decode.prompts.Caches`: vision features and prompt prefixes, from
`--vision-cache-mb` and `--prefix-cache-mb`) are shared by its groups: a request whose prompt
starts with a previous request's prompt and answer starts from their keys/values, and a request
that shows an image already seen reuses its features (`EngineRequest.cache` False: neither).

Per request, `Finished.output` is the request's own: `nfe` counts the forwards that did work for
its row (so `tokens_per_nfe` is its own), `timings["total_s"]` is its wall-clock time from the
start of its prefill to its finish, and the other timings (`prefill_s`, `denoise_s`, ...) are the
seconds its group spent in each phase while the request was in it (shared with its batch).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from dvlm.config import ConfigError, DecodeConfig
from dvlm.decode.ar import ARStepper
from dvlm.decode.block import BlockStepper
from dvlm.decode.output import GenerationOutput
from dvlm.decode.prompts import Caches
from dvlm.decode.settings import GroupSettings, RowSettings
from dvlm.decode.speculative import SpecStepper
from dvlm.decode.stepper import Stepper
from dvlm.model.loaded import LoadedModel
from dvlm.serve.answer_text import AnswerText
from dvlm.serve.handle import RequestHandle
from dvlm.serve.requests import (
    SERVED_DECODERS,
    Delta,
    EngineObserver,
    EngineRequest,
    EngineStoppedError,
    Finished,
    QueueFullError,
)

log = logging.getLogger(__name__)

STEPPERS: dict[str, type[Stepper]] = {"ar": ARStepper, "block": BlockStepper, "spec": SpecStepper}
assert tuple(STEPPERS) == SERVED_DECODERS


@dataclass
class _Entry:
    """A request from submission to its Finished."""

    request: EngineRequest
    handle: RequestHandle
    submitted: float
    key: tuple = ()  # the group key, settings resolved
    group: GroupSettings | None = None
    row: RowSettings | None = None
    invalid: str | None = None  # why the request cannot be served
    row_id: int | None = None  # once started
    started: float | None = None  # its prefill's start
    phases: dict[str, float] = field(default_factory=dict)  # its group's phase seconds when it started
    text: AnswerText | None = None
    first_delta: float | None = None

    def expired(self, now: float) -> bool:
        return self.request.timeout_s is not None and now - self.submitted > self.request.timeout_s


@dataclass
class _Group:
    key: tuple
    stepper: Stepper
    entries: dict[int, _Entry] = field(default_factory=dict)  # row id -> request
    prefill_forwards: int = 0  # forwards of prefills not yet reported to the observer


class Engine:
    """Serves EngineRequests on one model from one loop thread (see the module docstring)."""

    def __init__(self, lm: LoadedModel, *, max_batch_size: int = 16, max_queue: int = 64,
                 observer: EngineObserver | None = None, compile: bool = False,
                 caches: Caches | None = None) -> None:
        if max_batch_size < 1 or max_queue < 1:
            raise ValueError(f"max_batch_size and max_queue must be >= 1, got {max_batch_size} and {max_queue}")
        self.lm = lm
        self.compile = compile  # every request decodes under torch.compile (DecodeConfig.compile)
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.observer = observer or EngineObserver()
        self.caches = caches or Caches()  # touched by the loop thread only (read by /metrics)
        self._lock = threading.Condition()
        self._waiting: deque[_Entry] = deque()
        self._inflight: dict[int, _Entry] = {}  # id(handle) -> entry, every request not yet finished
        self._groups: dict[tuple, _Group] = {}  # touched by the loop thread only
        self._running = 0
        self._turn = 0
        self._stopping = False
        self._thread: threading.Thread | None = None

    @property
    def queue_depth(self) -> int:
        """Requests submitted, not yet prefilled."""
        return len(self._waiting)

    @property
    def running_rows(self) -> int:
        """Rows in running batches."""
        return self._running

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("the engine was started already")
        self._thread = threading.Thread(target=self._run, name="dvlm-engine", daemon=True)
        self._thread.start()

    def submit(self, request: EngineRequest) -> RequestHandle:
        """Queue a request; thread-safe and never waits for the model. A request the model cannot
        serve with its settings ends at once with finish_reason "error" and the reason."""
        handle = RequestHandle(request.id, self._wake)
        entry = _Entry(request, handle, time.perf_counter())
        try:
            entry.key, entry.group, entry.row = self._settings(request)
        except ConfigError as err:
            entry.invalid = str(err)
        with self._lock:
            if self._stopping:
                raise EngineStoppedError("the engine is shutting down and takes no new requests")
            if len(self._waiting) >= self.max_queue:
                raise QueueFullError(self.max_queue)
            self._waiting.append(entry)
            self._inflight[id(handle)] = entry
            self._lock.notify()
        return handle

    def check(self, request: EngineRequest) -> None:
        """Raise ConfigError (a ValueError) when the model cannot serve the request's settings, as
        `submit` would end it with an "error" Finished: lets the HTTP layer answer 400 first."""
        self._settings(request)

    def shutdown(self, timeout_s: float = 10.0) -> None:
        """Refuse new requests, end every in-flight one with an "error" Finished ("server shutting
        down") and stop the loop thread (waiting at most `timeout_s` for its current step)."""
        with self._lock:
            self._stopping = True
            self._lock.notify()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout_s)
        # Requests the loop did not end (never started, or its step outlasted the timeout).
        with self._lock:
            left = list(self._inflight.values())
        for entry in left:
            self._finish(entry, self._partial_output(entry, "error"), "server shutting down")

    def _wake(self) -> None:
        with self._lock:
            self._lock.notify()

    def _settings(self, request: EngineRequest) -> tuple[tuple, GroupSettings, RowSettings]:
        """(group key, group settings, row settings) of a request, the model's defaults filled in;
        ConfigError when it cannot be served."""
        if request.decoder not in STEPPERS:
            raise ConfigError(f"decoder {request.decoder!r} is not served; choose one of {', '.join(STEPPERS)}")
        cfg = DecodeConfig(decoder=request.decoder, max_new_tokens=request.max_new_tokens,
                           block_size=request.block_size, threshold=request.threshold, steps=request.steps,
                           temperature=request.temperature, top_k=request.top_k, top_p=request.top_p,
                           seed=request.seed, compile=self.compile)
        group, row = STEPPERS[request.decoder].settings_for(self.lm, cfg)
        # sub_block_size and fuse_commit are not request fields: one value per decoder, no need to key on them.
        return (request.decoder, group.block_size, group.steps), group, row

    # The loop thread.

    def _run(self) -> None:
        try:
            with torch.inference_mode():
                while self._iterate():
                    pass
            self._end_all("server shutting down")
        except BaseException as err:  # a bug in the loop itself: end every request rather than hang them
            log.exception("the engine loop failed")
            with self._lock:
                self._stopping = True
            self._end_all(f"engine failure: {type(err).__name__}: {err}")
            raise

    def _iterate(self) -> bool:
        """One iteration; False once shutting down."""
        with self._lock:
            while not self._stopping and not self._waiting and not self._groups:
                self._lock.wait()
            if self._stopping:
                return False
            arrivals = self._take_arrivals(time.perf_counter())
        self._end_cancelled_and_expired(time.perf_counter())
        self._admit(arrivals)
        self._step_groups()
        return True

    def _take_arrivals(self, now: float) -> list[_Entry]:
        """Waiting requests that can be admitted now, or ended (under the lock); the rest wait."""
        room = {key: self.max_batch_size - len(group.entries) for key, group in self._groups.items()}
        taken, waiting = [], deque()
        for entry in self._waiting:
            ends_now = entry.invalid or entry.handle.cancelled or entry.expired(now)
            free = room.get(entry.key, self.max_batch_size)
            if ends_now or free > 0:
                taken.append(entry)
                room[entry.key] = free - (0 if ends_now else 1)
            else:
                waiting.append(entry)
        self._waiting = waiting
        return taken

    def _admit(self, arrivals: list[_Entry]) -> None:
        by_group: dict[tuple, list[_Entry]] = {}
        for entry in arrivals:
            if entry.invalid:
                self._finish(entry, self._partial_output(entry, "error"), entry.invalid)
            elif entry.handle.cancelled:
                self._finish(entry, self._partial_output(entry, "cancelled"))
            elif entry.expired(time.perf_counter()):
                self._finish(entry, self._partial_output(entry, "timeout"), self._timeout_message(entry))
            else:
                by_group.setdefault(entry.key, []).append(entry)
        for key, entries in by_group.items():
            group = self._groups.get(key)
            if group is None:
                stepper = STEPPERS[entries[0].request.decoder](self.lm, entries[0].group, caches=self.caches)
                group = self._groups[key] = _Group(key, stepper)
            self._start_rows(group, entries)
            self._forget_if_empty(group)
        self._count_running()

    def _start_rows(self, group: _Group, entries: list[_Entry]) -> None:
        """Prefill the new requests as one batch, then merge them into the group's running batch."""
        stepper, now = group.stepper, time.perf_counter()
        phases, forwards = dict(stepper.timer.seconds), stepper.rows.forwards
        try:
            started = stepper.start([e.request.prompt for e in entries], [e.row for e in entries],
                                    [e.request.cache for e in entries])
        except Exception as err:  # only these requests fail: the running batch was not touched
            log.exception("prefill failed")
            for entry in entries:
                self._finish(entry, self._partial_output(entry, "error"), _describe(err))
            return
        for entry, row_id in zip(entries, started.ids):
            entry.row_id, entry.started, entry.phases = row_id, now, phases
            entry.text = AnswerText(self.lm.processor.decode, entry.request.stop)
            group.entries[row_id] = entry
        group.prefill_forwards += stepper.rows.forwards - forwards
        try:
            stepper.join(started)
        except Exception as err:
            self._fail_group(group, err)

    def _end_cancelled_and_expired(self, now: float) -> None:
        for group in list(self._groups.values()):
            ending = {row_id: entry for row_id, entry in group.entries.items()
                      if entry.handle.cancelled or entry.expired(now)}
            if not ending:
                continue
            group.stepper.drop(list(ending))
            for row_id, entry in ending.items():
                if entry.handle.cancelled:
                    self._finish_row(group, row_id, "cancelled")
                else:
                    self._finish_row(group, row_id, "timeout", self._timeout_message(entry))
            self._forget_if_empty(group)
        self._count_running()

    def _step_groups(self) -> None:
        """One step of every group, starting from a different group each iteration."""
        keys = list(self._groups)
        if not keys:
            return
        self._turn = (self._turn + 1) % len(keys)
        for key in keys[self._turn:] + keys[:self._turn]:
            group = self._groups.get(key)
            if group is not None:
                self._step(group)
        self._count_running()

    def _step(self, group: _Group) -> None:
        rows = group.stepper.num_active
        try:
            report = group.stepper.step()
        except Exception as err:
            self._fail_group(group, err)
            return
        self._observe("on_step", group.key, rows, report.forwards + group.prefill_forwards)
        group.prefill_forwards = 0
        now = time.perf_counter()
        stopped = []
        for row_id, tokens in report.committed:
            entry = group.entries[row_id]
            piece = entry.text.add(tokens)
            if piece:
                self._send(entry, piece, now)
            if entry.text.stopped and row_id not in report.finished:
                stopped.append(row_id)
        if stopped:  # a stop string ended these answers: their rows leave now
            group.stepper.drop(stopped)
        for row_id in report.finished + stopped:
            self._finish_row(group, row_id, None)
        self._forget_if_empty(group)

    def _send(self, entry: _Entry, piece: str, now: float) -> None:
        tokens = entry.text.incremental.tokens
        entry.handle.deliver(Delta(piece, tokens[entry.text.sent_tokens:]))
        entry.text.sent_tokens = len(tokens)
        if entry.first_delta is None:
            entry.first_delta = now

    def _finish_row(self, group: _Group, row_id: int, reason: str | None, error: str | None = None) -> None:
        """End a row that left its batch: its output (finish reason `reason`, else the stepper's),
        the text not sent yet as a last Delta, then its Finished."""
        entry = group.entries.pop(row_id)
        now = time.perf_counter()
        seconds = group.stepper.timer.seconds
        timings = {f"{phase}_s": seconds[phase] - entry.phases.get(phase, 0.0) for phase in seconds}
        timings["total_s"] = now - entry.started
        output = group.stepper.output(row_id, timings)
        group.stepper.forget([row_id])
        text, tokens, stopped = entry.text.final(output.tokens)
        output.text, output.tokens = text, tokens
        output.finish_reason = "stop" if stopped and reason is None else (reason or output.finish_reason)
        if rest := entry.text.unsent(text):
            entry.handle.deliver(Delta(rest, tokens[entry.text.sent_tokens:]))
            if entry.first_delta is None:
                entry.first_delta = now
        self._finish(entry, output, error)

    def _fail_group(self, group: _Group, err: Exception) -> None:
        """A step of this group failed: its requests end with "error"; the group is dropped."""
        log.exception("serving group %s failed", group.key)
        for row_id in list(group.entries):
            entry = group.entries.pop(row_id)
            self._finish(entry, self._partial_output(entry, "error"), _describe(err))
        self._groups.pop(group.key, None)
        self._count_running()

    def _forget_if_empty(self, group: _Group) -> None:
        """An empty group goes, with its context (its KV memory)."""
        if not group.entries and self._groups.get(group.key) is group:
            del self._groups[group.key]

    def _end_all(self, error: str) -> None:
        for group in list(self._groups.values()):
            for row_id in list(group.entries):
                self._finish_row(group, row_id, "error", error)
        self._groups.clear()
        with self._lock:
            waiting, self._waiting = list(self._waiting), deque()
        for entry in waiting:
            self._finish(entry, self._partial_output(entry, "error"), error)
        self._count_running()

    def _count_running(self) -> None:
        self._running = sum(group.stepper.num_active for group in self._groups.values())

    def _finish(self, entry: _Entry, output: GenerationOutput, error: str | None = None) -> None:
        start = entry.started if entry.started is not None else time.perf_counter()
        first = None if entry.first_delta is None else entry.first_delta - entry.submitted
        finished = Finished(output, error, queue_seconds=start - entry.submitted, first_token_seconds=first)
        with self._lock:
            self._inflight.pop(id(entry.handle), None)
        if entry.handle.deliver(finished):
            self._observe("on_finished", entry.request, finished)

    def _partial_output(self, entry: _Entry, reason: str) -> GenerationOutput:
        """The output of a request that ends outside its batch's step: the tokens it committed so far."""
        tokens = list(entry.text.incremental.tokens) if entry.text is not None else []
        total = 0.0 if entry.started is None else time.perf_counter() - entry.started
        return GenerationOutput(text=self.lm.processor.decode(tokens), tokens=tokens, finish_reason=reason,
                                decoder=entry.request.decoder, nfe=0, prompt_tokens=len(entry.request.prompt),
                                timings={"total_s": total})

    def _timeout_message(self, entry: _Entry) -> str:
        return f"the request ran past its timeout of {entry.request.timeout_s} s"

    def _observe(self, hook: str, *args) -> None:
        try:
            getattr(self.observer, hook)(*args)
        except Exception:  # an observer must not take the engine down; its failure is logged
            log.exception("engine observer %s failed", hook)


def _describe(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}"
