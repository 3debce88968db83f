"""Concurrent calls on one model share its generation (continuous batching across threads).

A model has one KV cache, so at most one Run works on it at a time. A call joins the run in progress (Run.add, its
own sampling parameters, stop ids and logprobs wish) and its rows decode in the same steps as everyone else's: N
concurrent requests cost about what one batch of N costs, not N runs one after another. There is no background
thread: a caller that waits for tokens while no one is stepping the run steps it itself (a Python generator may be
resumed from any thread, one at a time), and hands each step's tokens to the calls they belong to. So a single
caller drives its own generation on its own thread, as without batching.

A call cannot join a run of another kind (another Engine over the same model, another vocabulary limit, or a
drafting run, for a call that samples or has a penalty; a prompt_lookup call joins a plain run and
decodes plainly, to the same tokens); it waits until that run ends, and while it waits the run takes no new calls and no
call that came after it starts the next run, so it cannot be starved. A call that ends early (a stop string, a
closed or abandoned stream) has its rows finished before the next step. An exception while stepping
(KeyboardInterrupt, out of memory) ends the run: the thread that stepped gets it, and the other calls in the run a
RuntimeError that names it. A call may be iterated by one thread after another, not by two at once (a Python
generator then raises ValueError: generator already executing).
"""

from __future__ import annotations

import threading
import weakref
from typing import Iterator, Sequence

from .generation import Engine, GenerationResult, Run, SamplingParams, check_top_logprobs
from .model import Transformer

__all__ = ["Batcher", "Call", "batcher_of"]


class Call:
    """One call's rows in the shared run. Iterating yields lists of (index of the call's prompt, token id) as the
    steps that produce them run; closing it (or dropping it) finishes the rows still going."""

    def __init__(self, batcher: "Batcher", run: Run, rows: list[int]):
        self._batcher, self._run, self._rows = batcher, run, rows
        self._results = [run.result(r) for r in rows]  # the run forgets them once they have ended
        self._index = {r: i for i, r in enumerate(rows)}
        self._inbox: list[tuple[int, int]] = []
        self._open = True  # some row of the call is still generating
        self._error: BaseException | None = None
        self._ending: set[int] = set()  # rows the caller ended, for the next stepper to finish
        self._steps = self._consume()

    @property
    def results(self) -> list[GenerationResult]:
        """The outcome of each of the call's prompts (complete once iteration has ended)."""
        return self._results

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        return self._steps

    def close(self) -> None:
        self._steps.close()  # a started iteration ends its rows in its finally
        with self._batcher._cond:
            self._end()  # one never iterated has no finally to run

    def _end(self) -> None:
        """Ends the rows still going at the next step (the caller holds the condition)."""
        if self._open:
            self._ending.update(self._rows)
            self._open = False
        self._batcher._cond.notify_all()

    def finish(self, i: int) -> None:
        """Ends the call's prompt i (a stop string): its row is finished before the next step."""
        with self._batcher._cond:
            self._ending.add(self._rows[i])

    def _consume(self) -> Iterator[list[tuple[int, int]]]:
        b = self._batcher
        try:
            while True:
                with b._cond:
                    while not self._inbox and self._open and self._error is None:
                        if b._driving:
                            b._cond.wait()
                        else:
                            b._step()
                    items, self._inbox = self._inbox, []
                    if self._error is not None:
                        raise RuntimeError(f"the generation this call shared with others failed: "
                                           f"{self._error!r}") from self._error
                if items:
                    yield items
                elif not self._open:
                    return
        finally:
            with b._cond:
                self._end()  # closed early: the rest of its rows stop at the next step


class Batcher:
    """The shared run of one model and the calls in it."""

    def __init__(self):
        self._cond = threading.Condition()
        self._run: Run | None = None
        self._kind = None  # what a call must match to join the run
        self._calls: list[Call] = []  # the calls with rows in the run
        self._owner: dict[int, Call] = {}  # run row -> its call
        self._driving = False  # a thread is stepping the run (with the condition released)
        # Calls in submit, in arrival order, as (kind, token): a call may start or join a run only when every call
        # ahead of it is of its kind, so a call of another kind gets the next run (the run it waits for takes no
        # new calls meanwhile) and cannot be starved.
        self._line: list[tuple] = []
        self._joins: list[_Join] = []  # calls that arrived during a step, for the next step to add

    def submit(self, engine: Engine, prompts: Sequence[Sequence[int]], params: SamplingParams,
               stop_ids: Sequence[int], logprobs: bool = False, vocab: int | None = None,
               top_logprobs: int = 0) -> Call:
        """Adds a call's prompts to the run in progress (at its next step when a step is running), or starts one.
        Bad prompts or logprobs wishes raise here (ValueError)."""
        if vocab is not None and vocab >= engine.model.args.vocab_size:
            vocab = None  # no limit (as Run reads it): such calls share runs with generate()'s
        # (engine, vocab limit, drafts, may be in a drafting run): a run takes calls of its engine and vocab limit,
        # a drafting run only those that may be in one
        kind = (engine, vocab, params.prompt_lookup > 0, params.checks_drafts)
        # here: Run.add, run by another thread's step, must not fail
        prompts = engine.check_prompts(prompts)
        check_top_logprobs(logprobs, top_logprobs, vocab or engine.model.args.vocab_size)
        me = (kind, object())
        with self._cond:
            self._line.append(me)
            try:
                while True:
                    first = all(k == kind for k, _ in self._line[:self._line.index(me)])
                    if first and self._run is None:
                        run = engine.run(prompts, params, stop_ids, logprobs, vocab, top_logprobs)
                        self._run, self._kind, self._calls, self._owner = run, kind, [], {}
                        return self._join(run, list(range(len(prompts))))
                    fits = self._run is not None and self._kind[:2] == kind[:2] and (
                        kind[3] or not self._run.lookup)
                    if first and fits and not self._driving:
                        return self._join(self._run, self._run.add(prompts, params, stop_ids, logprobs,
                                                                   top_logprobs))
                    if first and fits:
                        # A step is running: the next step takes the call in (its stepper may well be the thread
                        # stepping now, which would otherwise take the condition back before this one wakes).
                        join = _Join(prompts, params, stop_ids, logprobs, top_logprobs)
                        self._joins.append(join)
                        run = self._run
                        while join.call is None and self._run is run and self._driving:
                            self._cond.wait()
                        if join.call is not None:
                            return join.call
                        if join in self._joins:  # no step has started since (a run that ended drops its joins)
                            self._joins.remove(join)
                    elif self._run is not None and not self._driving:
                        self._step()  # a run this call cannot join yet: step it towards its end
                    else:
                        self._cond.wait()
            finally:
                self._line.remove(me)
                self._cond.notify_all()  # the calls behind it may go now

    def _join(self, run: Run, rows: list[int]) -> Call:
        call = Call(self, run, rows)
        self._calls.append(call)
        self._owner.update((r, call) for r in rows)
        return call

    def _step(self) -> None:
        """Runs one step of the run (the caller holds the condition; it is released during the step) and hands
        out its tokens; drops the run when it has ended."""
        run = self._run
        for join in self._joins:
            join.call = self._join(run, run.add(join.prompts, join.params, join.stop_ids, join.logprobs,
                                                join.top_logprobs))
        self._joins.clear()
        for call in self._calls:
            for r in call._ending:
                run.finish(r)
            call._ending.clear()
        self._driving = True
        self._cond.release()
        step, error = None, None
        try:
            step = next(iter(run), None)
        except BaseException as e:  # noqa: B902: the run is over whatever ended it; the stepper re-raises it
            error = e
        finally:
            self._cond.acquire()
            self._driving = False
        for r, t in step or ():
            self._owner[r]._inbox.append((self._owner[r]._index[r], t))
        ended = step is None
        for call in self._calls:
            if error is not None:
                call._error = error
            if ended or all(run.done(r) for r in call._rows):
                call._open = False
                if not ended:  # the call holds its results: the run and this map forget its rows
                    run.release(call._rows)
                    for r in call._rows:
                        self._owner.pop(r, None)
        # A call closed during this step keeps its place until the next step has finished its rows.
        self._calls = [c for c in self._calls if c._open or c._ending]
        if ended:
            self._run = None
            self._joins.clear()  # calls waiting for the next step of this run: they start or join the next one
        self._cond.notify_all()
        if error is not None:
            raise error


class _Join:
    """A call waiting for the next step to add it to the run."""

    def __init__(self, prompts, params, stop_ids, logprobs, top_logprobs):
        self.prompts, self.params, self.stop_ids = prompts, params, stop_ids
        self.logprobs, self.top_logprobs = logprobs, top_logprobs
        self.call: Call | None = None


_BATCHERS: "weakref.WeakKeyDictionary[Transformer, Batcher]" = weakref.WeakKeyDictionary()
_BATCHERS_GUARD = threading.Lock()


def batcher_of(model: Transformer) -> Batcher:
    """The one Batcher of a model, shared by every CodeLlama over it (they share its KV cache)."""
    with _BATCHERS_GUARD:
        return _BATCHERS.setdefault(model, Batcher())
