"""The training loop every job shares: `fit(plan, job, model)`.

One optimizer step: the global batch's example indices (model/engine/order.py) are cut into this
rank's `grad_accum` micro-batches; each goes through the job's `batch` and `loss`, its backward
accumulates into .grad; DDP averages the gradients over the processes on the last micro-step only;
the gradient norm is clipped; AdamW steps. Since each micro-batch's loss is divided by their number,

    loss = (1 / (A * W)) * sum over micro-batches of the job's mean loss

so `grad_accum 2 x batch 2` and `batch 4` (or 2 processes x batch 2) train the same model up to
float rounding.

Around it: evaluation (`job.evaluate`) and samples (`job.sample`) on rank 0 under
`torch.random.fork_rng`, so *when* they run does not change the training stream; metrics.jsonl,
loss.png and checkpoint.pt (model/engine/run_files.py). On a checkpoint step the checkpoint is
written first, so an evaluation or a sample that fails can never lose the training.

Signals: Ctrl-C (SIGINT) or SIGTERM during the loop finishes the current step, writes a checkpoint
at it, says how to resume, and raises KeyboardInterrupt / model.cli.Terminated (exit 130 / 143
through model.cli.run). A second signal stops at once, without a checkpoint.
"""

from __future__ import annotations

import contextlib
import math
import random
import signal
import threading
import time
from dataclasses import asdict

import torch

from model.cli import Terminated, UsageError
from model.engine.job import unwrap
from model.engine.order import BatchOrder, micro_batches
from model.engine.plan import Plan, resume_key
from model.engine.run_files import (
    CHECKPOINT,
    CHECKPOINT_FORMAT,
    METRICS,
    PLOT,
    append_metrics,
    plot_metrics,
    read_metrics,
    rng_state,
    save_checkpoint,
    set_rng_state,
    write_metrics,
)
from model.engine.schedule import lr_at, param_groups


def forward_backward(loss_fn, batches, ddp=None, autocast=contextlib.nullcontext) -> torch.Tensor:
    """Accumulate the gradient of the mean of loss_fn(batch) over `batches` into .grad.

    Each micro-batch's loss is divided by their number, so the summed gradients are those of the
    mean. Under DDP the gradient all-reduce runs only in the last backward (`no_sync` on the others):
    one communication per optimizer step instead of one per micro-batch. Returns the mean loss (detached).
    """
    total = 0.0
    for i, batch in enumerate(batches):
        last = i == len(batches) - 1
        with ddp.no_sync() if ddp is not None and not last else contextlib.nullcontext():
            with autocast():
                loss = loss_fn(batch)
            (loss / len(batches)).backward()
        total = total + loss.detach().float()
    return total / len(batches)


class StopSignal:
    """While active: the first SIGINT / SIGTERM is remembered (the loop stops at the end of the step,
    with a checkpoint); a second one raises at once."""

    def __init__(self, say):
        self.signum, self.say, self._old = None, say, {}

    def _handler(self, signum, frame):
        if self.signum is not None:  # asked twice: stop now
            raise KeyboardInterrupt if signum == signal.SIGINT else Terminated()
        self.signum = signum
        self.say(f"{signal.Signals(signum).name}: finishing this step, then saving a checkpoint "
                 "(send it again to stop at once, without one)")

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # signals reach the main thread only
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc):
        for s, old in self._old.items():
            signal.signal(s, old)

    def raise_it(self):
        raise KeyboardInterrupt if self.signum == signal.SIGINT else Terminated()


class MetricsLog:
    """metrics.jsonl of this run. With --overwrite of an existing run the rows are kept in memory
    until the new run's first checkpoint, so a new run that dies early leaves the old one whole."""

    def __init__(self, plan: Plan, start: int):
        self.path = plan.out / METRICS
        self.pending = plan.mode == "replace"
        self.rows: list[dict] = []  # this session's rows
        self.buffer: list[dict] = []
        plan.out.mkdir(parents=True, exist_ok=True)
        if plan.mode == "resume":
            # Keep the rows up to the checkpoint: a run killed after it may have logged steps beyond it.
            write_metrics(self.path, [r for r in read_metrics(self.path) if r["step"] <= start])
        elif plan.mode == "fresh":
            write_metrics(self.path, [])
            (plan.out / PLOT).unlink(missing_ok=True)

    def checkpointed(self) -> None:
        """Right after a checkpoint was written: an --overwrite run now replaces the old one."""
        if self.pending:
            write_metrics(self.path, self.buffer)
            (self.path.parent / PLOT).unlink(missing_ok=True)
            self.pending, self.buffer = False, []

    def add(self, row: dict) -> None:
        self.rows.append(row)
        if self.pending:
            self.buffer.append(row)
        else:
            append_metrics(self.path, row)


def _eval_line(metrics: dict) -> str:
    """eval_train_loss 3.2 -> "train loss 3.200"."""
    return ", ".join(f"{k.removeprefix('eval_').replace('_', ' ')} {v:.3f}" for k, v in metrics.items())


def fit(plan: Plan, job, model: torch.nn.Module) -> dict:
    """Train `model` (built by the caller; its parameters with requires_grad are trained) on `job` as
    planned. Returns {"model": the trained bare model, "rows": this session's metric rows, "step":
    the last step, "metrics": the last evaluation}."""
    import torch.distributed as torch_dist

    ddp_on = plan.dist.world_size > 1
    if ddp_on:
        if plan.device.type == "cuda":
            torch.cuda.set_device(plan.device)
        torch_dist.init_process_group("nccl" if plan.device.type == "cuda" else "gloo")
    try:
        return _fit(plan, job, model, ddp_on)
    finally:
        if ddp_on:
            torch_dist.destroy_process_group()


def _fit(plan: Plan, job, model, ddp_on: bool) -> dict:
    import torch.distributed as torch_dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    from tqdm.auto import tqdm

    rc, dist, device, out = plan.rc, plan.dist, plan.device, plan.out
    say = (lambda msg: tqdm.write(msg)) if dist.main else (lambda msg: None)
    for note in plan.notes:
        say(note)

    model = model.to(device)
    groups = param_groups(model, rc.weight_decay)
    trainable = [p for g in groups for p in g["params"]]
    if not trainable:
        raise UsageError(f"{job.name}: no parameter of the model is trainable (all have requires_grad=False)")
    # fused=True: one kernel over all parameters instead of a loop of small ops (10x faster on CPU).
    optimizer = torch.optim.AdamW(groups, lr=rc.lr, fused=True)
    order = BatchOrder(job.n_train(), plan.global_batch, rc.seed)
    start = 0
    if plan.checkpoint is not None:
        model.load_state_dict(plan.checkpoint["model"])
        optimizer.load_state_dict(plan.checkpoint["optimizer"])
        order.load_state_dict(plan.checkpoint["data"])
        start = int(plan.checkpoint["step"])
        set_rng_state(plan.checkpoint["rng"][dist.rank], device)
    else:
        # Dropout masks must differ between ranks (they see different data but share the seed).
        torch.manual_seed(rc.seed + dist.rank)
        random.seed(rc.seed + dist.rank)

    ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None) if ddp_on else None
    forward = ddp if ddp is not None else model
    if rc.compile:
        forward = torch.compile(forward)
    amp = torch.bfloat16 if rc.dtype == "bfloat16" else None
    autocast = (lambda: torch.autocast(device.type, dtype=amp)) if amp else contextlib.nullcontext

    log = MetricsLog(plan, start) if dist.main else None
    n_params = sum(p.numel() for p in model.parameters())
    n_trainable = sum(p.numel() for p in trainable)
    say(f"{job.name}: {n_params / 1e6:.1f}M parameters"
        + (f" ({n_trainable / 1e6:.2f}M trainable)" if n_trainable != n_params else "")
        + f", {rc.dtype} on {device}" + (f" x {dist.world_size} processes" if ddp_on else ""))
    say(job.describe())
    say(f"{plan.steps_per_epoch} steps per epoch of {plan.global_batch} examples; {plan.total_steps} steps"
        + (f", resuming after step {start}" if plan.checkpoint else "") + f"; writing to {out}")

    sample_every = rc.sample_every if rc.sample_every is not None else rc.eval_every
    stop = min(plan.total_steps, rc.stop_after or plan.total_steps)
    fork_devices = [device] if device.type == "cuda" else []
    bare = unwrap(model)

    def quiet(fn):
        """fn(bare model) under no_grad, eval() and a forked RNG: it cannot touch the training stream."""
        with torch.random.fork_rng(devices=fork_devices), torch.no_grad():
            was_training = bare.training
            bare.eval()
            try:
                return fn(bare)
            finally:
                bare.train(was_training)

    def checkpoint(step: int) -> None:
        rng = [rng_state(device)]
        if ddp_on:  # every rank's own stream (dropout masks differ per rank)
            rng = [None] * dist.world_size
            torch_dist.all_gather_object(rng, rng_state(device))
        if dist.main:
            save_checkpoint(out / CHECKPOINT, {
                "format": CHECKPOINT_FORMAT,
                "job": job.name,
                "step": step,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "data": order.state_dict(),
                "rng": rng,
                "schedule": {"step": step, "total_steps": plan.total_steps, "warmup_steps": plan.warmup_steps,
                             "lr": rc.lr, "min_lr": plan.min_lr},
                "model_config": plan.model_config,
                "run_config": asdict(rc),
                "job_config": job.config() if hasattr(job, "config") else {},
                "resume_key": resume_key(rc, job),
                "world_size": dist.world_size,
            })
            log.checkpointed()

    bar = tqdm(total=stop, initial=start, disable=not (dist.main and rc.progress), dynamic_ncols=True,
               desc="train", unit="step")
    model.train()
    step, last_eval = start, {}
    with StopSignal(say) as stop_signal:
        while step < stop:
            lr = lr_at(step, lr=rc.lr, min_lr=plan.min_lr, warmup_steps=plan.warmup_steps,
                       total_steps=plan.total_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            t0 = time.perf_counter()
            idx = order.next()
            batches = [job.batch(mb, device)
                       for mb in micro_batches(idx, rc.batch_size, rc.grad_accum, dist.rank, dist.world_size)]
            loss = forward_backward(lambda b: job.loss(forward, b), batches, ddp, autocast)
            if rc.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(trainable, rc.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            # The global batch's loss and tokens, not this rank's share; the stop flag too, so that
            # every rank stops at the same step (gloo has no AVG: sum, then divide).
            stats = torch.tensor([loss.item(), sum(job.tokens(b) for b in batches),
                                  float(stop_signal.signum is not None)], dtype=torch.float64)
            if ddp_on:
                stats = stats.to(device)
                torch_dist.all_reduce(stats, op=torch_dist.ReduceOp.SUM)
                stats = stats.cpu()
            train_loss, tokens, stopping = stats[0].item() / dist.world_size, stats[1].item(), stats[2].item() > 0
            step += 1
            tok_s = tokens / (time.perf_counter() - t0)
            if not math.isfinite(train_loss):
                raise UsageError(
                    f"the training loss is {train_loss} at step {step}: training diverged; lower --lr "
                    f"(now {rc.lr:g}) or lengthen --warmup-steps"
                    + (f" (the checkpoint in {out} is kept)" if (out / CHECKPOINT).exists() else "")
                )

            row = {"step": step, "epoch": round(step / plan.steps_per_epoch, 4), "train_loss": train_loss,
                   "lr": lr, "tokens_per_sec": round(tok_s, 1)}
            epoch_end = order.batch == 0
            last = step == stop
            periodic = rc.eval_every > 0 and step % rc.eval_every == 0
            if periodic or last or stopping:
                checkpoint(step)  # before evaluating and sampling: those can never lose the training
            if dist.main:
                if (periodic or epoch_end or last) and not stopping:
                    bar.set_description_str("eval")
                    last_eval = quiet(lambda m: job.evaluate(m, device, autocast))
                    row.update(last_eval)
                    where = f"epoch {order.epoch}{f'/{rc.epochs}' if rc.epochs else ''}, " if epoch_end else ""
                    say(f"{where}step {step}: {_eval_line(last_eval)}, lr {lr:.2e}")
                if ((sample_every > 0 and step % sample_every == 0) or last) and not stopping:
                    bar.set_description_str("sample")
                    text = quiet(lambda m: job.sample(m, device))
                    if text is not None:
                        row["sample"] = text
                        say(f"sample (step {step}): {text!r}")
                bar.set_description_str("train", refresh=False)
                log.add(row)
                bar.set_postfix_str(f"loss {train_loss:.3f}, {tok_s:,.0f} tok/s, lr {lr:.2e}", refresh=False)
                bar.update(1)
            if not ddp_on and not stopping and stop_signal.signum is not None:
                stopping = True  # the signal came during the evaluation or the sample: save this step
                checkpoint(step)
            if dist.main and (periodic or last or stopping):
                plot_metrics(read_metrics(out / METRICS), out / PLOT, f"{job.name}: {out.name}")
            if stopping:
                break
        bar.close()
        if stop_signal.signum is not None:
            say(f"stopped at step {step}/{plan.total_steps} with a checkpoint in {out / CHECKPOINT}; "
                "continue with the same command plus --resume")
            if ddp_on:
                torch_dist.barrier()
            stop_signal.raise_it()
    if dist.main and step > start:
        state = "stopped" if step < plan.total_steps else "done"
        say(f"{state} at step {step}/{plan.total_steps}"
            + (f": {_eval_line(last_eval)}" if last_eval else "")
            + f"; wrote {out / METRICS}, {out / PLOT}, {out / CHECKPOINT}")
    if ddp_on:
        torch_dist.barrier()  # rank 0 may still be writing
    return {"model": model, "rows": log.rows if log else [], "step": step, "metrics": last_eval}
