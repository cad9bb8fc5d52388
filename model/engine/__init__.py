"""One training engine for every job: pretraining, classification and instruction fine-tuning.

The loop owns everything a job has in common: the learning-rate schedule (warmup + cosine), AdamW's
weight-decay groups over the trainable parameters, gradient accumulation and clipping, bfloat16
autocast, DistributedDataParallel, the progress bar (loss, tokens/sec, lr; it reads "eval" or
"sample" while it evaluates or samples), periodic evaluation under `torch.random.fork_rng`,
metrics.jsonl, loss.png, atomic checkpoints, exact `--resume`, Ctrl-C / SIGTERM with a checkpoint,
and the refusals (one line each, exit 2 through model/cli.py). A job supplies only its data, its
loss and its evaluation:

    class Job:                                          # model/engine/job.py has the full contract
        name: str                                       # "pretrain", "classify", "instruct"
        def n_train(self) -> int                        # training examples; epoch e's order is a
                                                        #   permutation of range(n) drawn from (seed, e)
        def batch(self, idx, device) -> Any             # one micro-batch from example indices
        def loss(self, model, batch) -> Tensor          # scalar mean loss (call model(...): may be DDP)
        def tokens(self, batch) -> int                  # for tokens/sec
        def evaluate(self, model, device, autocast) -> dict[str, float]
                                                        # e.g. eval_train_loss, val_loss, val_accuracy;
                                                        #   run under no_grad / eval() / fork_rng, rank 0
        def sample(self, model, device) -> str | None   # optional showcase text, same conditions
        def describe(self) -> str                       # its lines of the run header
        def resume_key(self) -> dict                    # settings that fix the data order, by flag name
        def config(self) -> dict                        # optional: saved in the checkpoint as job_config

A script uses it in three calls:

    from model.engine import RunConfig, add_run_arguments, fit, prepare
    add_run_arguments(parser, lr=5e-5, epochs=5)        # the loop's flags, declared once
    rc = RunConfig.from_args(args)
    plan = prepare(rc, job, model_config=cfg.to_dict(), n_params=..., default_out="runs/x")
                                                        # every check; writes nothing
    model = ...                                         # the caller's: fresh or --init-from, with
                                                        #   requires_grad set on what trains
    result = fit(plan, job, model)                      # {"model", "rows", "step", "metrics"}

Files: config.py (RunConfig and its flags), schedule.py (lr_at, param_groups), order.py (data
order), run_files.py (checkpoint, metrics, plot, RNG states), plan.py (the checks: prepare -> Plan),
job.py (the Job contract), loop.py (fit).
"""

from model.engine.config import HelpFormatter, RunConfig, add_run_arguments, flag
from model.engine.job import Job, unwrap
from model.engine.loop import fit, forward_backward
from model.engine.order import BatchOrder, epoch_order, micro_batches
from model.engine.plan import Dist, Plan, check_memory, prepare, training_memory
from model.engine.run_files import CHECKPOINT, METRICS, PLOT, load_checkpoint, read_metrics
from model.engine.schedule import lr_at, param_groups

__all__ = [
    "BatchOrder", "CHECKPOINT", "Dist", "HelpFormatter", "Job", "METRICS", "PLOT", "Plan", "RunConfig",
    "add_run_arguments", "check_memory", "epoch_order", "fit", "flag", "forward_backward", "load_checkpoint",
    "lr_at", "micro_batches", "param_groups", "prepare", "read_metrics", "training_memory", "unwrap",
]
