"""The serving engine: one loop thread owns the model and batches requests between blocks.

Requests wait in a bounded queue (`QueueFullError` beyond `max_queue`). Each iteration of the loop
1. ends the requests that were cancelled or ran past their timeout (their rows leave at once);
2. admits waiting requests into the group of their settings: requests whose settings cannot share
   a forward (decoder, block size, fixed step count: `group_key`, the model's defaults filled in)
   run in separate groups; per-row settings (threshold, sampling, max_new_tokens, stop) share one.
   A group holds at most `max_batch_size` rows; the admitted requests of a group are prefilled as
   one small batch, then join its running batch;
3. advances every group by one step (one block; one token for ar), round robin, and hands each
   request its newly committed text as a `Delta`; rows that finish (EOS, max_new_tokens, a stop
   string) leave the batch at once and get their `Finished` (finish_reason "timeout" if their
   timeout passed during the step, even though the step completed their answer).

The groups are the decoders' own steppers (`dvlm.decode.stepper`): the engine runs the step code
`generate` runs, so a request's answer equals `generate` of that request alone (invariant 7).
Nothing but the loop thread calls the model.

Failures stay where they happen. Anything that raises while serving a group (its prefill, a step,
decoding its text, ending its rows) ends that group's requests with finish_reason "error" and the
reason; the other groups and the waiting requests go on. Ending a request never raises (an answer
that cannot even be decoded ends without its text). An exception escaping an iteration ends the
requests it was serving, and the loop goes on; should the loop thread ever end, every request in
flight ends, `alive` turns False and `submit` refuses. At interpreter exit the loop finishes its
step first: a thread frozen inside a torch op kills the process with SIGABRT.

The engine's `caches` (`dvlm.decode.prompts.Caches`: vision features and prompt prefixes, from
`--vision-cache-mb` and `--prefix-cache-mb`) are shared by its groups: a request whose prompt
starts with a previous request's prompt and answer starts from their keys/values, and a request
that shows an image already seen reuses its features (`EngineRequest.cache` False: neither).

Per request, `Finished.output` is the request's own: `nfe` counts the forwards that did work for
its row, `timings["total_s"]` is its time from the start of its prefill to its finish, and the
other timings (`prefill_s`, ...) are its group's seconds per phase while it was in it.
"""

from __future__ import annotations

import atexit
import logging
import threading
import time
from collections import deque
from collections.abc import Callable

import torch

from dvlm.config import ConfigError
from dvlm.decode.output import GenerationOutput
from dvlm.decode.prompts import Caches
from dvlm.model.loaded import LoadedModel
from dvlm.serve.answer_text import AnswerText
from dvlm.serve.entries import STEPPERS, Entry, Group, bare_output, describe, partial_output, request_settings
from dvlm.serve.handle import RequestHandle
from dvlm.serve.requests import (
    Delta,
    EngineObserver,
    EngineRequest,
    EngineStoppedError,
    Finished,
    QueueFullError,
)

log = logging.getLogger(__name__)

SHUTTING_DOWN = "server shutting down"


class Engine:
    """Serves EngineRequests on one model from one loop thread (see the module docstring).
    `clock` gives the seconds that submission times and timeouts are measured in."""

    def __init__(self, lm: LoadedModel, *, max_batch_size: int = 16, max_queue: int = 64,
                 observer: EngineObserver | None = None, compile: bool = False, caches: Caches | None = None,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        if max_batch_size < 1 or max_queue < 1:
            raise ValueError(f"max_batch_size and max_queue must be >= 1, got {max_batch_size} and {max_queue}")
        self.lm = lm
        self.compile = compile  # every request decodes under torch.compile (DecodeConfig.compile)
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.observer = observer or EngineObserver()
        self.caches = caches or Caches()  # touched by the loop thread only (read by /metrics)
        self._clock = clock
        self._lock = threading.Condition()
        self._waiting: deque[Entry] = deque()
        self._inflight: dict[int, Entry] = {}  # id(handle) -> entry, every request not yet finished
        self._groups: dict[tuple, Group] = {}  # touched by the loop thread only
        self._running = 0
        self._turn = 0
        self._stopping = False
        self._failure: str | None = None  # why the loop thread ended, if it failed
        self._thread: threading.Thread | None = None

    @property
    def queue_depth(self) -> int:
        """Requests submitted, not yet prefilled."""
        return len(self._waiting)

    @property
    def running_rows(self) -> int:
        """Rows in running batches."""
        return self._running

    @property
    def alive(self) -> bool:
        """Whether the loop thread is serving: started, not shutting down, and still running."""
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("the engine was started already")
        self._thread = threading.Thread(target=self._run, name="dvlm-engine", daemon=True)
        atexit.register(self._stop_at_exit)
        self._thread.start()

    def submit(self, request: EngineRequest) -> RequestHandle:
        """Queue a request; thread-safe and never waits for the model. A request the model cannot
        serve with its settings ends at once with finish_reason "error" and the reason."""
        handle = RequestHandle(request.id, self._wake)
        entry = Entry(request, handle, self._clock())
        try:
            entry.key, entry.group, entry.row = request_settings(self.lm, request, self.compile)
        except ConfigError as err:
            entry.invalid = str(err)
        with self._lock:
            if self._failure is not None:
                raise EngineStoppedError(f"the engine has stopped ({self._failure})")
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
        request_settings(self.lm, request, self.compile)

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
        self._end_entries(left, "error", SHUTTING_DOWN)

    def _stop_at_exit(self) -> None:
        """Interpreter exit (atexit runs before daemon threads are frozen): stop, and let the
        current step finish, however long it takes."""
        self.shutdown()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()

    def _wake(self) -> None:
        with self._lock:
            self._lock.notify()

    # The loop thread.

    def _run(self) -> None:
        reason = SHUTTING_DOWN
        try:
            with torch.inference_mode():
                while self._iterate_or_recover():
                    pass
        except BaseException as err:  # not an Exception (those are recovered from): the loop ends here
            log.critical("the engine loop stopped", exc_info=err)
            reason = self._failure = f"engine failure: {describe(err)}"
        finally:
            with self._lock:
                self._stopping = True
            self._end_all(reason)
            atexit.unregister(self._stop_at_exit)

    def _iterate_or_recover(self) -> bool:
        try:
            return self._iterate()
        except Exception as err:  # a bug in the loop's own code: end what it was serving, serve the rest
            log.exception("an engine iteration failed; its running requests end")
            self._recover(err)
            return True

    def _iterate(self) -> bool:
        """One iteration; False once shutting down."""
        with self._lock:
            while not self._stopping and not self._waiting and not self._groups:
                self._lock.wait()
            if self._stopping:
                return False
            arrivals = self._take_arrivals(self._clock())
        self._end_cancelled_and_expired(self._clock())
        self._admit(arrivals)
        self._step_groups()
        return True

    def _take_arrivals(self, now: float) -> list[Entry]:
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

    def _admit(self, arrivals: list[Entry]) -> None:
        by_group: dict[tuple, list[Entry]] = {}
        for entry in arrivals:
            if entry.invalid:
                self._end_entries([entry], "error", entry.invalid)
            elif entry.handle.cancelled:
                self._end_entries([entry], "cancelled")
            elif entry.expired(self._clock()):
                self._end_entries([entry], "timeout", entry.timeout_message())
            else:
                by_group.setdefault(entry.key, []).append(entry)
        for key, entries in by_group.items():
            self._start_rows(key, entries)
        self._count_running()

    def _start_rows(self, key: tuple, entries: list[Entry]) -> None:
        """Prefill the new requests as one batch, then merge them into their group's running batch."""
        group = self._groups.get(key)
        try:
            if group is None:
                stepper_cls = STEPPERS[entries[0].request.decoder]
                group = Group(key, stepper_cls(self.lm, entries[0].group, caches=self.caches))
            stepper, now = group.stepper, self._clock()
            phases, forwards = dict(stepper.timer.seconds), stepper.rows.forwards
            started = stepper.start([e.request.prompt for e in entries], [e.row for e in entries],
                                    [e.request.cache for e in entries])
        except Exception as err:  # only these requests fail: the running batch was not touched
            log.exception("prefill failed")
            self._end_entries(entries, "error", describe(err))
            return
        self._groups[key] = group
        for entry, row_id in zip(entries, started.ids):
            entry.row_id, entry.started, entry.phases = row_id, now, phases
            entry.text = AnswerText(self.lm.processor.decode, entry.request.stop)
            group.entries[row_id] = entry
        group.prefill_forwards += stepper.rows.forwards - forwards
        self._guarded(group, lambda: stepper.join(started))

    def _end_cancelled_and_expired(self, now: float) -> None:
        for group in list(self._groups.values()):
            ending = [row_id for row_id, entry in group.entries.items()
                      if entry.handle.cancelled or entry.expired(now)]
            if ending:
                self._guarded(group, self._end_rows, group, ending, now)
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
                self._guarded(group, self._step, group)
        self._count_running()

    def _step(self, group: Group) -> None:
        rows = group.stepper.num_active
        report = group.stepper.step()
        self._observe("on_step", group.key, rows, report.forwards + group.prefill_forwards)
        group.prefill_forwards = 0
        now = self._clock()
        ended = list(report.finished)
        for row_id, tokens in report.committed:
            entry = group.entries[row_id]
            piece = entry.text.add(tokens)
            if piece:
                self._send(entry, piece, now)
            if entry.text.stopped and row_id not in report.finished:
                ended.append(row_id)  # a stop string ended this answer: its row leaves now
        # Rows still running past their timeout end at the next iteration's start, before any more work.
        self._end_rows(group, ended, now)

    def _end_rows(self, group: Group, row_ids: list[int], now: float) -> None:
        """End rows of a group, the ones still in its batch leaving it: a row that was cancelled or ran
        past its timeout (at `now`) ends so, the others as their answer did."""
        group.stepper.drop([row_id for row_id in row_ids if row_id in group.stepper.rows.active])
        for row_id in row_ids:
            entry = group.entries[row_id]
            if entry.handle.cancelled:
                self._finish_row(group, row_id, "cancelled")
            elif entry.expired(now):
                self._finish_row(group, row_id, "timeout", entry.timeout_message())
            else:
                self._finish_row(group, row_id, None)
        self._forget_if_empty(group)

    def _send(self, entry: Entry, piece: str, now: float) -> None:
        if entry.first_delta is None:
            entry.first_delta = now
        if not entry.request.stream:  # the Finished carries the whole answer
            return
        tokens = entry.text.incremental.tokens
        entry.handle.deliver(Delta(piece, tokens[entry.text.sent_tokens:]))
        entry.text.sent_tokens = len(tokens)

    def _finish_row(self, group: Group, row_id: int, reason: str | None, error: str | None = None) -> None:
        """End a row that left its batch: its output (finish reason `reason`, else the stepper's),
        the text not sent yet as a last Delta, then its Finished."""
        entry = group.entries[row_id]
        now = self._clock()
        output = group.stepper.output(row_id, entry.timings(group.stepper.timer.seconds, now))
        text, tokens, stopped = entry.text.final(output.tokens, output.text)
        group.stepper.forget([row_id])
        del group.entries[row_id]
        output.text, output.tokens = text, tokens
        output.finish_reason = "stop" if stopped and reason is None else (reason or output.finish_reason)
        if rest := entry.text.unsent(text):
            if entry.request.stream:
                entry.handle.deliver(Delta(rest, tokens[entry.text.sent_tokens:]))
            if entry.first_delta is None:
                entry.first_delta = now
        self._finish(entry, output, error, stop_string=stopped and output.finish_reason == "stop")

    def _guarded(self, group: Group, action: Callable[..., None], *args) -> None:
        """Run `action` on one group's work; if it raises, that group fails, and only that group."""
        try:
            action(*args)
        except Exception as err:
            self._fail_group(group, err)

    def _fail_group(self, group: Group, err: Exception) -> None:
        """Serving this group failed: its requests end with "error"; the group (its KV memory) goes."""
        log.error("serving group %s failed", group.key, exc_info=err)
        if self._groups.get(group.key) is group:
            del self._groups[group.key]
        entries = list(group.entries.values())
        group.entries.clear()
        self._end_entries(entries, "error", describe(err))
        self._count_running()

    def _recover(self, err: Exception) -> None:
        """After an iteration failed outside any group's work: the groups go (their state is not to be
        trusted), and every request not still waiting ends with "error"; the waiting ones stay."""
        self._groups.clear()
        with self._lock:
            waiting = {id(entry.handle) for entry in self._waiting}
            affected = [entry for key, entry in self._inflight.items() if key not in waiting]
        self._end_entries(affected, "error", describe(err))
        self._count_running()

    def _forget_if_empty(self, group: Group) -> None:
        """An empty group goes, with its context (its KV memory)."""
        if not group.entries and self._groups.get(group.key) is group:
            del self._groups[group.key]

    def _end_all(self, error: str) -> None:
        """Shutting down: every request still in flight ends with "error". Never raises."""
        for group in list(self._groups.values()):
            self._guarded(group, self._end_group, group, error)
        self._groups.clear()
        with self._lock:
            waiting, self._waiting = list(self._waiting), deque()
        self._end_entries(waiting, "error", error)
        self._count_running()

    def _end_group(self, group: Group, error: str) -> None:
        for row_id in list(group.entries):
            self._finish_row(group, row_id, "error", error)

    def _count_running(self) -> None:
        self._running = sum(group.stepper.num_active for group in self._groups.values())

    def _end_entries(self, entries: list[Entry], reason: str, error: str | None = None) -> None:
        """End requests outside their batch's step with the tokens they committed so far. Never
        raises: a partial answer that cannot be decoded (the failure being handled may be that very
        decoding) ends without its text, and that is logged once."""
        failure = None
        for entry in entries:
            try:
                output = partial_output(entry, reason, self.lm.processor.decode, self._clock())
            except Exception as err:
                failure = failure or err
                output = bare_output(entry, reason, self._clock())
            self._finish(entry, output, error)
        if failure is not None:
            log.error("%d request(s) ended without their partial answers, which could not be decoded: %s",
                      len(entries), describe(failure))

    def _finish(self, entry: Entry, output: GenerationOutput, error: str | None = None,
                stop_string: bool = False) -> None:
        start = entry.started if entry.started is not None else self._clock()
        first = None if entry.first_delta is None else entry.first_delta - entry.submitted
        finished = Finished(output, error, queue_seconds=start - entry.submitted, first_token_seconds=first,
                            stop_string=stop_string)
        with self._lock:
            self._inflight.pop(id(entry.handle), None)
        entry.handle.deliver(finished, before=lambda: self._observe("on_finished", entry.request, finished))

    def _observe(self, hook: str, *args) -> None:
        try:
            getattr(self.observer, hook)(*args)
        except Exception:  # an observer must not take the engine down; its failure is logged
            log.exception("engine observer %s failed", hook)

