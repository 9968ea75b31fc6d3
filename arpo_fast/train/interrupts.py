"""Stopping a run on SIGINT (Ctrl-C) or SIGTERM (a scheduler, torchrun) without losing a step.

During setup a signal stops the run at once: nothing has been trained. During training, a signal
that arrives in a step's rollout (rollout, rewards, advantages: the weights are untouched) abandons
the step at once; one that arrives elsewhere (the update, an evaluation, a save) lets that work
finish. Either way the run then saves the checkpoint of its last complete step (unless it has
just been saved), says in one line how to resume and exits with 130 (SIGINT) or 143 (SIGTERM).

Under torchrun the ranks agree: at the end of every step's rollout each rank says whether it was
signalled (an all-reduce, on the rollout-wait group), so every rank abandons the same step, even
when only one was signalled, and all save together. That all-reduce is also where a rank that
finished its rollout waits for the slowest one (``--rollout-timeout-s``).

A second signal within ``GRACE_S`` of the first counts as the same request (Ctrl-C reaches every
rank from the terminal and again from torchrun); a later one stops at once, keeping the checkpoint
saved last.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
import time
from dataclasses import dataclass
from typing import Optional

GRACE_S = 2.0
SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(BaseException):
    """The run stopped on a signal (a BaseException, as KeyboardInterrupt: no ``except Exception``
    on the way turns it into an error). ``step``: the last complete step; ``checkpoint``: where it
    is saved; ``at_once``: stopped by a second signal without saving; ``setup``: before training."""

    def __init__(self, signum: int, *, step=None, checkpoint=None, at_once=False, setup=False):
        super().__init__(signum)
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        self.at_once, self.setup = at_once, setup

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name

    def describe(self, out: str, steps: int, torchrun: bool) -> str:
        """One line for the user: what stopped, what was saved, and how to continue."""
        command = "torchrun command" if torchrun else "command"
        again = f"to continue, run the same {command} with --out {out} --resume true"
        if self.setup:
            return f"stopped by {self.name} during setup; nothing was trained or saved"
        if self.at_once:
            if self.checkpoint is None:
                return f"stopped at once by a second {self.name}; no checkpoint was saved"
            return (
                f"stopped at once by a second {self.name}; the last checkpoint saved is "
                f"{self.checkpoint}; {again}"
            )
        return (
            f"stopped by {self.name} after step {self.step} of {steps}; the checkpoint of that step is "
            f"in {self.checkpoint}; {again}"
        )


class RolloutAbandoned(BaseException):
    """Raised by the signal handler inside a step's rollout; the loop then agrees to stop."""


class StepAbandoned(Exception):
    """Every rank abandons the step under way: one of them was signalled."""


@dataclass
class _State:
    signum: Optional[int] = None
    """The signal this process received."""
    agreed: Optional[int] = None
    """The signal any rank received, once the ranks agreed to stop."""
    first_at: float = 0.0
    training: bool = False
    in_rollout: bool = False


_state: Optional[_State] = None


def _handler(signum, frame) -> None:
    s = _state
    if s is None:
        return
    now = time.monotonic()
    if s.signum is None:
        s.signum, s.first_at = signum, now
        if not s.training:
            raise Interrupted(signum, setup=True)
        if s.in_rollout:
            s.in_rollout = False
            raise RolloutAbandoned()
    elif now - s.first_at > GRACE_S:
        raise Interrupted(s.signum, at_once=True)


@contextlib.contextmanager
def handling():
    """SIGINT and SIGTERM handled as this module says, for the block (only in the main thread,
    where Python runs signal handlers); the previous handlers come back afterwards."""
    global _state
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _state = _State()
    previous = {sig: signal.signal(sig, _handler) for sig in SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        _state = None


def begin_training() -> None:
    """From here a signal lets the run save its last complete step."""
    if _state is not None:
        _state.training = True


def stopping() -> Optional[int]:
    """The signal that stops the run (received by this rank or, once agreed, by any)."""
    if _state is None:
        return None
    return _state.agreed or _state.signum


def _agree(d, own: Optional[int]) -> int:
    """The signal any rank received (0: none); every rank calls this once per step, at the same
    point, which is also where the first rank done with its rollout waits for the last."""
    if d is None:
        found = own or 0
    else:
        try:
            found = int(d.max([float(own or 0)], group=d.rollout_group)[0])
        except RuntimeError as exc:
            first = (str(exc).strip().splitlines() or [""])[0][:200]
            raise RuntimeError(
                f"waited for every rank to finish its rollout (--rollout-timeout-s "
                f"{d.timeouts.rollout:g}): {first}"
            ) from None
    if found and _state is not None:
        _state.agreed = found
    return found


def enter_rollout(d) -> None:
    """Call before a step's rollout: a signal received from here to :func:`leave_rollout`
    abandons the step at once. A run already stopping abandons it without starting."""
    s = _state
    if s is not None and s.signum is not None:
        _agree(d, s.signum)
        raise StepAbandoned()
    if s is not None:
        s.in_rollout = True


def leave_rollout(d) -> None:
    """Call after a step's rollout, rewards and advantages, before the update: every rank learns
    whether any was signalled, and if so all raise :class:`StepAbandoned`."""
    s = _state
    if s is not None:
        s.in_rollout = False
    if _agree(d, None if s is None else s.signum):
        raise StepAbandoned()


def abandoned(d) -> None:
    """After :class:`RolloutAbandoned` reached the loop: agree with the other ranks (which are in
    :func:`leave_rollout` or :func:`enter_rollout`) that the step is abandoned."""
    if _state is not None:
        _state.in_rollout = False
        _agree(d, _state.signum)


def report(exc: Interrupted, cfg, rank: int, ranked: bool) -> int:
    """Say (rank 0) how the run stopped and how to continue it; returns the exit status."""
    from arpo_fast.train import distributed
    from arpo_fast.train.checkpoint import find_checkpoint

    if exc.at_once:
        exc.checkpoint = find_checkpoint(cfg.out)
    first = distributed.first_to_fail(rank) if ranked else True  # later broken collectives stay quiet
    agreed = not (exc.at_once or exc.setup)  # every rank stopped together: rank 0 speaks for all
    if (agreed and rank == 0) or (not agreed and first):
        print(f"arpo_fast.train: {exc.describe(cfg.out, cfg.steps, ranked)}", file=sys.stderr, flush=True)
    return exc.exit_code
