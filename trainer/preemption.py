"""Stop cleanly when the cluster says the job must end (preemption or time limit).

SLURM sends SIGUSR2 (`--signal=USR2@<delay>`) to every task of a job shortly
before it is preempted or reaches its time limit. A signal handler cannot save
a checkpoint itself: it interrupts the training step at an arbitrary point and
every DDP rank receives it at a different step, while a checkpoint is a
collective. So the handler only records the request; the training loop asks
all ranks at its step boundaries (`StopVote`, `stop_agreed`), saves the exact
position there on every rank together and raises `Preempted`. The job wrapper then
hands over to submitit, which requeues the job.

If no step boundary comes within `grace_s` (the signal arrived during data
preparation, evaluation or extraction), a timer re-sends the signal and the
second delivery goes straight to submitit's handler: the job requeues from its
last periodic checkpoint instead of being killed without a requeue.
"""
from __future__ import annotations

import os
import signal
import threading
import time


class Preempted(Exception):
    """Raised by the training loop after it saved a checkpoint because a stop was requested."""

    def __init__(self, step: int, path: str):
        super().__init__(f"stopped for requeue at step {step}; checkpoint {path}")
        self.step, self.path = step, path


class StopRequest:
    """The process-wide record of a stop signal (armed only inside a cluster job)."""

    def __init__(self):
        self.armed = False
        self.requested = False
        self.signum: int | None = None
        self.received_at: float | None = None
        self.previous = None          # the handler installed before ours (submitit's checkpoint-and-requeue)
        self._timer: threading.Timer | None = None
        self._fallback = False        # set by the timer just before it re-sends the signal
        self._grace_s = 60.0

    def arm(self, signum: int = signal.SIGUSR2, grace_s: float = 60.0) -> None:
        """Install the recording handler for `signum` (from the main thread), keeping the previous one."""
        self.previous = signal.getsignal(signum)
        self.signum, self._grace_s = signum, grace_s
        self.requested, self._fallback, self.received_at = False, False, None
        signal.signal(signum, self._on_signal)
        self.armed = True

    def disarm(self) -> None:
        self.acknowledge()
        if self.armed and self.previous is not None:
            signal.signal(self.signum, self.previous)
        self.armed = False

    def _on_signal(self, signum, frame) -> None:
        if self._fallback:
            # Our own timer's delivery: no step boundary came in time. Requeue from the last checkpoint.
            print(f"no training step within {self._grace_s:.0f} s of the signal: requeueing from the last "
                  f"checkpoint", flush=True)
            self.hand_over(signum, frame)
            return
        if self.requested:
            return
        self.requested, self.received_at = True, time.time()
        print(f"received {signal.Signals(signum).name}: will checkpoint at the next step and requeue", flush=True)
        self._timer = threading.Timer(self._grace_s, self._fire, (signum,))
        self._timer.daemon = True
        self._timer.start()

    def _fire(self, signum: int) -> None:
        self._fallback = True
        os.kill(os.getpid(), signum)

    def acknowledge(self) -> None:
        """The loop is stopping cooperatively: cancel the fallback timer."""
        if self._timer is not None:
            self._timer.cancel()

    def hand_over(self, signum=None, frame=None) -> None:
        """Call the handler we replaced (submitit: checkpoint(), requeue, exit); may raise or exit."""
        self.acknowledge()
        if callable(self.previous):
            self.previous(signum or self.signum, frame)


STOP = StopRequest()


def stop_agreed(engine) -> bool:
    """True on every rank when any rank was asked to stop. A collective when armed with several processes."""
    if not STOP.armed:
        return False
    return engine.any_rank(STOP.requested)


class StopVote:
    """The training loop's per-step stop vote, without a wait per step.

    With several processes, the vote of step s is a non-blocking all-reduce started at step s and read at
    step s + 1, by when it has long finished: no process waits at every step for the other processes'
    hosts. Every process reads the same vote at the same step, so all stop at the same step, one step after
    the first that saw the signal. One process needs no collective at all.
    """

    def __init__(self, engine):
        self.engine, self.pending = engine, None

    def poll(self) -> bool:
        """At a step boundary (every rank): True on every rank together when a stop was agreed."""
        if not STOP.armed:
            return False
        if self.engine.world_size == 1:
            return STOP.requested
        agreed = self.settle()
        if not agreed:
            self.pending = self.engine.any_rank_async(STOP.requested)
        return agreed

    def settle(self) -> bool:
        """The outcome of the vote in flight (False if none), leaving none in flight."""
        if self.pending is None:
            return False
        work, vote = self.pending
        self.pending = None
        work.wait()
        return bool(vote.item())
