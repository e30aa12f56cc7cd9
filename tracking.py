"""Experiment tracking for train.py: Weights & Biases (nanoGPT's wandb_log, wandb_project, wandb_run_name) and
TensorBoard event files (tensorboard_log, through tensorboardX: no TensorFlow). Both are optional extras
(`pip install -e ".[track]"`) and run in process 0 only.

    trackers = trackers(config, out_dir, run_id, first_iter)   # [] when neither is asked for
    with closing(trackers):
        log(trackers, it, {"train/loss": 1.9, "val/loss": 2.0, "lr": 1e-3, ...})

A resumed run continues the same W&B run (run_id, kept in the checkpoint) and the same TensorBoard folder (events
after its checkpoint's iteration, which it repeats, are dropped: purge_step). W&B keeps its files in $WANDB_DIR when
set, else in out_dir/wandb; TensorBoard's go to out_dir/tensorboard. A tracker that cannot start, or fails mid-run (a
full disk, the service down), is reported once and dropped: training goes on.
"""
import contextlib
import importlib.util
import os
import sys
import time
import uuid
from pathlib import Path

import files
from cli import UsageError

EXTRAS = {"wandb_log": ("wandb", "wandb"), "tensorboard_log": ("tensorboardX", "tensorboardX")}  # key: (module, pip)


def check_installed(config):
    """Asking for a tracker that is not installed fails at start, in one line naming the extra."""
    for key, (module, package) in EXTRAS.items():
        if config[key] and importlib.util.find_spec(module) is None:
            raise UsageError(f"{key} needs {package}: pip install -e \".[track]\" (or pip install {package})")


def new_run_id():  # a W&B run id: 8 lowercase letters and digits
    return uuid.uuid4().hex[:8]


def trackers(config, out_dir, run_id, first_iter):
    """-> the trackers config asks for, open. run_id: the W&B run this run continues (or starts). One that cannot
    start (no W&B key, a file where TensorBoard's folder goes) is reported in one line; training goes on without it."""
    opened = []
    for key, start in (("wandb_log", start_wandb), ("tensorboard_log", start_tensorboard)):
        if config[key]:
            try:
                opened.append(start(config, out_dir, run_id, first_iter))
            except Exception as e:  # whatever the optional library raises: training matters more than its charts
                name = key.removesuffix("_log")
                print(f"warning: {name} could not start ({one_line(e)}); training goes on without it", file=sys.stderr,
                      flush=True)
    return opened


def start_wandb(config, out_dir, run_id, first_iter):
    import wandb  # optional extra: imported only when asked for
    run = wandb.init(project=config["wandb_project"], name=config["wandb_run_name"] or None, id=run_id,
                     resume="allow", config=config, dir=os.environ.get("WANDB_DIR") or str(out_dir))
    return {"name": "wandb", "log": lambda values, step: run.log(values, step=step), "close": run.finish}


def start_tensorboard(config, out_dir, run_id, first_iter):
    import tensorboardX  # optional extra: imported only when asked for
    files.refuse_link(Path(out_dir) / "tensorboard")  # its events would land wherever the link points
    # a resumed run repeats what came after its checkpoint's iteration: TensorBoard drops those events
    # tensorboardX names an event file by the second and the host alone: a run resumed within the same second
    # would write over the first one's file. The suffix (nanoseconds, fixed width) keeps them apart, in order.
    writer = tensorboardX.SummaryWriter(str(Path(out_dir) / "tensorboard"),
                                        purge_step=first_iter + 1 if first_iter else None,
                                        filename_suffix=f".{time.time_ns()}")

    def add_scalars(values, step):
        for name, value in values.items():
            writer.add_scalar(name, value, step)
        writer.flush()
    return {"name": "tensorboard", "log": add_scalars, "close": writer.close}


def one_line(error):  # an exception's message on one line
    return " ".join(str(error).split()) or type(error).__name__


def charted(record):  # a metrics.jsonl record -> what the trackers chart, under nanoGPT's W&B names
    return {"train/loss": record["train_loss"], "val/loss": record["val_loss"], "lr": record["lr"],
            "tokens_per_s": record["tokens_per_s"], "mfu": record["mfu"], "peak_memory_gb": record["peak_memory_gb"]}


def log(opened, it, values):
    """Log values (None ones left out) at iteration it to each tracker; one that fails is reported and dropped."""
    values = {name: value for name, value in values.items() if value is not None}
    for tracker in list(opened):
        try:
            tracker["log"](values, it)
        except Exception as e:  # any failure of an optional logger: training matters more than its charts
            print(f"warning: {tracker['name']} failed ({one_line(e)}); training goes on without it", file=sys.stderr)
            opened.remove(tracker)


@contextlib.contextmanager
def closing(opened):  # the trackers, closed however the block ends
    try:
        yield opened
    finally:
        for tracker in opened:
            try:
                tracker["close"]()
            except Exception as e:  # as in log: a tracker never stops a run
                print(f"warning: {tracker['name']} did not close cleanly ({e})", file=sys.stderr)
