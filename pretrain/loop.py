"""The training loop: step, check finiteness, log, save, evaluate, stop; one method each.

Every process runs the same steps and reaches the same collectives in the same order: saves are
collective, and multi-process runs agree (one tiny all-gather at log steps) on time-based saves
and, without JAX's preemption sync manager, on stopping.
"""

import math
import time
from typing import Any

import jax

from pretrain import checkpoint as checkpoint_lib
from pretrain import distributed
from pretrain import metrics as metrics_lib
from pretrain import peak_flops as peak_flops_lib
from pretrain import nonfinite, preemption
from pretrain import setup as setup_lib


class TrainLoop:
    """Trains `setup` from `state` to train.steps; `run()` returns the logged history."""

    def __init__(self, setup: setup_lib.Setup, state, pipeline, data_iter,
                 checkpointer: checkpoint_lib.Checkpointer, writer: metrics_lib.MetricsWriter, *,
                 eval_step, peak_flops: float, skipped_steps: int = 0,
                 lineage: tuple[dict[str, Any], ...] = ()):
        self.setup, self.cfg = setup, setup.cfg
        self.state, self.pipeline, self.data_iter = state, pipeline, data_iter
        self.checkpointer, self.writer = checkpointer, writer
        self.eval_step, self.peak_flops = eval_step, peak_flops
        self.lineage = list(lineage)
        self.guard = nonfinite.NonFiniteGuard(self.cfg.train.nonfinite_policy,
                                              self.cfg.train.max_consecutive_skips, skipped_steps)
        self.step = int(jax.device_get(state.step))
        self.history: list[dict[str, float]] = []
        self.evals: list[dict[str, float]] = []
        self.compiled = None
        self.last_timed = self.step   # the step the throughput clock last restarted at
        self.throughput = metrics_lib.Throughput()
        self.watcher = preemption.Watcher()
        self.save_timer = checkpoint_lib.SaveTimer(self.cfg.checkpoint.every_minutes)
        self.collective = jax.process_count() > 1 and (
            self.save_timer.interval > 0 or self.watcher.needs_agreement)
        self.pending = None   # (step, metrics) whose non-finite flag has not been read yet

    def run(self) -> dict[str, Any]:
        train_cfg = self.cfg.train
        preempted = False
        try:
            with self.watcher:
                while self.step < train_cfg.steps:
                    metrics = self.train_one_step()
                    if metrics is None:   # a stop signal arrived before the first update
                        preempted = True
                        break
                    log, save, stop = self.decide()
                    evaluate = train_cfg.eval_every and (self.step % train_cfg.eval_every == 0
                                                         or self.step == train_cfg.steps)
                    # Never log, evaluate or save a step before knowing it was finite: under
                    # nonfinite_policy='stop' the state of a flagged step is not rolled back.
                    if log or save or evaluate:
                        self.check_pending()
                    if log:
                        self.log(metrics)
                    # Evaluate before saving: whenever checkpoint N exists, so does the eval row
                    # of step N (a resume starts after N and would never write it).
                    if evaluate:
                        self.evaluate()
                    if save:
                        self.save()
                    if stop:
                        preempted = self.stop()
                        break
        finally:
            self.checkpointer.close()   # waits for an in-flight save, also after an error
            self.writer.close()
        return {'history': self.history, 'eval': self.evals, 'step': self.step,
                'params': self.setup.param_count, 'state': self.state, 'preempted': preempted,
                'skipped': self.skipped_steps}

    @property
    def skipped_steps(self) -> int:
        return self.guard.skipped

    def train_one_step(self):
        """Runs one update on the next batch; returns its metrics (still on the device), or None
        when a stop signal came during start-up or compiling (nothing trained, nothing to save)."""
        batch = self.setup.global_batch(next(self.data_iter))
        if self.compiled is None:
            self.compile(batch)
            if self.watcher.should_stop(self.step):
                self.writer.text(f'stopped before the first update (step {self.step}); the '
                                 'checkpoint it started from is unchanged')
                return None
        self.state, metrics = self.compiled(self.state, batch)
        self.step += 1
        # Reading the previous step's flag, not this one's, keeps this step queued on the
        # device while the host prepares the next batch.
        self.check_pending()
        self.pending = (self.step, metrics)
        return metrics

    def compile(self, batch) -> None:
        self.writer.text('compiling the train step ...')
        start = time.perf_counter()
        self.compiled = self.setup.train_step.lower(self.state, batch).compile()
        if self.cfg.train.eval_every:   # also compiled now: processes must not drift apart
            self.eval_step = self.eval_step.lower(self.state.params, batch).compile()
        self.writer.text(f'compiled the train step in {time.perf_counter() - start:.1f}s')
        # A process that hit the compilation cache must not reach the first collective more
        # than gloo's fixed 30 s before one that compiled.
        distributed.barrier('train_step_compiled')
        self.restart_clock()
        self.save_timer.reset()

    def decide(self) -> tuple[bool, bool, bool]:
        """(log, save, stop) after this step; the same answer on every process."""
        train_cfg = self.cfg.train
        stop = self.watcher.should_stop(self.step)
        log = self.step % train_cfg.log_every == 0 or self.step == train_cfg.steps
        timed = False
        if log:   # the host waits for the step here anyway
            timed = self.save_timer.due()
            if self.collective:
                stop, timed = preemption.agree(
                    stop or (self.watcher.needs_agreement and self.watcher.local_flag), timed)
        stop = stop and self.step < train_cfg.steps   # the last step is a normal finish
        # Not orbax's should_save: it also saves the first step and polls the preemption sync
        # point a second time.
        save = (stop or timed or self.step == train_cfg.steps
                or self.step % self.cfg.checkpoint.every_steps == 0)
        return log, save, stop

    def check_pending(self) -> None:
        """Acts on the non-finite flag of the step not yet checked (reading it waits for it):
        skip it or stop, as train.nonfinite_policy and max_consecutive_skips say."""
        if self.pending is None:
            return
        at, metrics = self.pending
        self.pending = None
        flag = int(metrics['nonfinite'])
        line = self.guard.check(at, flag, float(metrics['loss']) if flag else 0.0,
                                float(metrics['grad_norm']) if flag else 0.0, self.last_checkpoint)
        if line:
            self.writer.text(line)

    def last_checkpoint(self) -> tuple[str | None, int | None]:
        self.checkpointer.wait()   # an async save of an earlier, good step may still be committing
        last = self.checkpointer.latest_step()
        return (None if last is None else self.checkpointer.path(last)), last

    def log(self, metrics) -> None:
        setup = self.setup
        logged = {k: float(v) for k, v in jax.device_get(metrics).items() if k != 'nonfinite'}
        done = self.step - self.last_timed
        speed = self.throughput.update(tokens=setup.tokens_per_step * done,
                                       flops=setup.flops_per_step * done, steps=done)
        self.last_timed = self.step
        logged.update(tokens=float(self.step * setup.tokens_per_step),
                      skipped=float(self.skipped_steps), **speed,
                      mfu=peak_flops_lib.mfu(speed['flops_per_s'], self.peak_flops))
        self.history.append({'step': self.step, **logged})
        self.writer.write(self.step, logged)

    def save(self) -> None:
        self.checkpointer.save(self.step, self.state, self.data_iter, self.record(), force=True)
        self.save_timer.reset()
        self.restart_clock()   # the time a save blocks is not training throughput

    def record(self) -> dict[str, Any]:
        """The JSON record saved with a checkpoint (checked again on resume and branch)."""
        return {'step': self.step, 'config': self.cfg.to_dict(),
                'schedule': self.setup.schedule_spec.to_dict(),
                'param_shapes': self.setup.param_shapes, 'skipped_steps': self.skipped_steps,
                'lineage': self.lineage}

    def stop(self) -> bool:
        """After a preemption signal's save: waits for it to commit; True (preempted)."""
        self.checkpointer.wait()
        self.writer.text(f'preempted at step {self.step}: checkpoint saved to '
                         f'{self.checkpointer.path(self.step)}')
        return True

    def evaluate(self) -> None:
        totals: dict[str, float] = {}
        batches = 0
        for local in self.pipeline.eval_batches():
            out = jax.device_get(self.eval_step(self.state.params, self.setup.global_batch(local)))
            for k, v in out.items():
                totals[k] = totals.get(k, 0.0) + float(v)
            batches += 1
        result = {'loss': totals['loss'] / batches}
        if 'bytes' in totals:
            result['bits_per_byte'] = (result['loss'] * totals['tokens']
                                       / (math.log(2) * totals['bytes']))
        self.writer.write(self.step, result, split='eval')
        self.evals.append({'step': self.step, **result})
        self.restart_clock()   # eval time is not training throughput

    def restart_clock(self) -> None:
        self.throughput.reset()
        self.last_timed = self.step
