"""The submitit job object: run some stages of one run; on preemption or time limit, checkpoint and requeue.

submitit pickles a `StageJob` and unpickles it in every task of the SLURM job
(one task per GPU, possibly on several nodes). Each task reads its rank and
the master address from the allocation, joins the process group and runs the
stages like a local run. The stage's own checkpoints carry all training
state, so a requeued job needs nothing but itself: it starts the same stages,
which resume from their latest checkpoint.
"""
from __future__ import annotations

import contextlib
import os
import subprocess
import time
from pathlib import Path

from omegaconf import OmegaConf

from .records import read_state, write_state


LOCK_WAIT_S = 120.0


class StageJob:
    def __init__(self, cfg, stages: list[str]):
        # The resolved config as YAML text: unpickles anywhere, independent of omegaconf internals.
        self.cfg_yaml = OmegaConf.to_yaml(cfg)
        self.stages = list(stages)
        self.run_root = str(Path(cfg.runs_dir).expanduser() / cfg.run)

    def __repr__(self) -> str:
        return f"StageJob({Path(self.run_root).name}: {'+'.join(self.stages)})"

    def __call__(self) -> dict:
        import submitit

        from trainer.preemption import STOP, Preempted
        from trainer.run_lock import run_lock
        from trainer.stages import run_stages

        env = submitit.JobEnvironment()
        if env.num_tasks > 1:
            # MASTER_ADDR/PORT, RANK, WORLD_SIZE, LOCAL_RANK from the allocation; the engine reads them.
            # Devices are picked by local rank, so CUDA_VISIBLE_DEVICES is left as SLURM set it.
            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
        cfg = OmegaConf.create(self.cfg_yaml)
        main = env.global_rank == 0
        root = Path(self.run_root)
        job_id = str(env.job_id)
        if main:
            write_state(root, self.stages, job_id, "running", tasks=env.num_tasks, nodes=env.num_nodes)
        STOP.arm(grace_s=max(10.0, cfg.cluster.signal_delay_s / 2))
        try:
            # One writer per run: a local launch of this run, or an older job that outlives its cancel, makes
            # this one fail clearly, after a wait as long as SLURM gives a cancelled job to end (KillWait).
            lock = run_lock(root, wait_s=LOCK_WAIT_S, say=print) if main else contextlib.nullcontext()
            with lock:
                summary = run_stages(cfg, self.stages)
        except Preempted as stop:
            self._requeue(main, root, job_id, stop)
            raise  # only reached when no requeue handler exists (cluster=debug)
        except SystemExit:
            if main and STOP.requested:  # submitit requeued from a signal that came outside a training step
                write_state(root, self.stages, job_id, "requeued", reason="signal outside a training step: "
                            "requeued from the last periodic checkpoint")
            raise
        except Exception as e:
            if main:
                first = (str(e).strip().splitlines() or [""])[0][:300]
                reason = f"{type(e).__name__}: {first}"
                if STOP.requested and isinstance(e, submitit.core.utils.UncompletedJobError):
                    # The signal came outside a training step and submitit, handed it after the grace period,
                    # refused to requeue: only time limits are counted (cluster.max_timeouts).
                    reason = self._not_requeued("time limit before a training step", e, "the last checkpoint")
                write_state(root, self.stages, job_id, "failed", reason=reason, log=_stderr_log(env))
            raise
        finally:
            STOP.disarm()
        if main:
            write_state(root, self.stages, job_id, "completed", tasks=env.num_tasks, nodes=env.num_nodes,
                        top1=summary.get("top1"), result=str(root / self.stages[-1] / "result"))
        return summary

    def checkpoint(self, *args, **kwargs):
        """Called by submitit when SLURM signals preemption or the time limit.

        By then the training loop has saved its exact position (or, if no
        training step came within the grace period, the last periodic
        checkpoint is on disk), so the job requeues as it is: the stages
        resume from their checkpoints.
        """
        import submitit

        return submitit.helpers.DelayedSubmission(self)

    def _requeue(self, main: bool, root: Path, job_id: str, stop) -> None:
        from submitit.core.utils import UncompletedJobError

        from trainer.preemption import STOP

        if not main:
            # Rank 0 requeues the whole job (SLURM then ends this task); if it cannot, it records why.
            deadline = time.time() + 600
            while time.time() < deadline:
                state = read_state(root, self.stages[0]) or {}
                if state.get("state") == "failed":
                    raise SystemExit(f"job not requeued: {state.get('reason')}")
                time.sleep(2)
            raise SystemExit("rank 0 did not requeue the job within 10 minutes")
        handler = getattr(STOP.previous, "__self__", None)  # submitit's SignalHandler
        if handler is None:
            write_state(root, self.stages, job_id, "failed", reason=f"stopped at step {stop.step}: no requeue "
                        f"handler (not a SLURM job); relaunch the same command to resume", step=stop.step)
            return
        cause = "time limit" if handler.has_timed_out() else "preemption"
        try:
            STOP.hand_over()  # submitit: checkpoint(), `scontrol requeue`, exit
        except SystemExit:
            write_state(root, self.stages, job_id, "requeued", reason=cause, step=stop.step, checkpoint=stop.path)
            raise
        except subprocess.CalledProcessError:
            # `scontrol requeue` refused: under PreemptMode=REQUEUE SLURM is already requeueing the job itself.
            write_state(root, self.stages, job_id, "requeued", reason=f"{cause} (requeued by SLURM)",
                        step=stop.step, checkpoint=stop.path)
            raise SystemExit(-1)
        except UncompletedJobError as e:  # submitit refuses: too many timeouts
            write_state(root, self.stages, job_id, "failed", step=stop.step, checkpoint=stop.path,
                        reason=self._not_requeued(f"{cause} at step {stop.step}", e, stop.path))
            raise

    def _not_requeued(self, what: str, error: Exception, resume_from) -> str:
        """The failure reason of a job that submitit would not requeue (its timeouts are spent)."""
        cfg = OmegaConf.create(self.cfg_yaml)
        return (f"{what} and not requeued ({error}; cluster.max_timeouts={cfg.cluster.max_timeouts}); "
                f"relaunch the same command to resume from {resume_from}")


def _stderr_log(env) -> str | None:
    """This task's submitit stderr file, where the traceback is (None outside a submitit job process)."""
    return str(env.paths.stderr) if "SUBMITIT_FOLDER" in os.environ else None
