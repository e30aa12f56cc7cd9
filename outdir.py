"""What a training run keeps in its out_dir, and the claim on it: checkpoints, the model and its vocabulary, the metrics
and their plot. Every file is written atomically (files.atomic_write: a crash never leaves a half-written file, and the
previous version stays intact until the new one is whole).

    with claimed_out_dir(config):         # a lock a second run meets at once; an earlier run's files cleared
        save_checkpoint(out_dir, params, opt_state, it, best_val_loss, config, hparams)
        save_model(out_dir, hparams, params)
    params, opt_state, meta = load_checkpoint(out_dir / CKPT_NAME, optimizer_for)

The files:
  - ckpt.safetensors: the last state, written at every evaluation after the first, at the end and on Ctrl-C:
    params, AdamW state, iteration, best val loss and config, for init_from=resume (with LoRA: the adapters, their
    state, and the base model's name or folder);
  - params.safetensors: the best params by val loss (with always_save_checkpoint, the latest at each evaluation), in
    weights.py's model-folder format, beside the vocabulary (meta.json for characters, encoder.json + vocab.bpe for
    GPT-2 tokens): out_dir is a model folder that main.py --model_dir and weights.load_hparams_and_params read;
  - metrics.jsonl: one JSON object per evaluation (iter, train_loss, val_loss, lr, tokens_per_s, mfu, elapsed_s,
    peak_memory_gb);
  - loss.png: the loss curves, when matplotlib is installed.
In a run of several processes, process 0 writes them all.
"""
import contextlib
import json
from pathlib import Path

import jax
import numpy as np
import safetensors.numpy
from jax.experimental import multihost_utils

import data
import files
import weights

CKPT_NAME = "ckpt.safetensors"
CKPT_FORMAT = "gptjax-train-1"
VOCABULARY_FILES = ("meta.json", "encoder.json", "vocab.bpe")  # characters, or GPT-2's BPE
RUN_FILES = (CKPT_NAME, "params.safetensors", "metrics.jsonl", "loss.png", *VOCABULARY_FILES)  # what a run writes


# ------------------------------------------------------------------------------------------------- the claim


def check_out_dir(config):
    """A run that does not continue out_dir's model (init_from=resume) must not replace it unasked."""
    out_dir = Path(config["out_dir"])
    if config["init_from"] == "resume" or config["overwrite"]:
        return
    for name in (CKPT_NAME, "params.safetensors"):
        if (out_dir / name).exists():
            raise FileExistsError(f"{out_dir} already holds a trained model ({name}): continue it with "
                                  f"--init_from=resume, train into another --out_dir, or replace it with --overwrite")


@contextlib.contextmanager
def claimed_out_dir(config):
    """Hold out_dir for the run: a lock that a second train.py on the same folder meets at once (the system drops it
    when this process ends, however it ends), the temporary files of a killed run removed, and (unless the run
    continues out_dir's model) the files of an earlier run removed, so that none of them mixes with this run's."""
    out_dir = Path(config["out_dir"])
    out_dir.mkdir(parents=True, exist_ok=True)
    with files.locked(out_dir / ".lock", busy=f"{out_dir} is in use by another train.py: wait for it to end, or "
                                               f"give another --out_dir"):
        check_out_dir(config)  # again, now that no other run can write there
        files.remove_stale_temporaries(out_dir)
        if config["init_from"] == "resume":
            drop_metrics_after(out_dir, read_checkpoint_meta(out_dir / CKPT_NAME)["iter"])
        else:
            for name in RUN_FILES:
                (out_dir / name).unlink(missing_ok=True)
        yield


# ------------------------------------------------------------------------------------------------- checkpoints


def save_checkpoint(out_dir, params, opt_state, it, best_val_loss, config, hparams, base=None):
    """The whole training state -> out_dir/ckpt.safetensors, atomically (a crash or a full disk leaves the previous
    checkpoint as it was)."""
    tensors = {name: host_array(x) for name, x in {**flat_names(params, "params/"),
                                                    **flat_names(opt_state, "opt_state/")}.items()}
    metadata = {"format": CKPT_FORMAT, "iter": str(it), "best_val_loss": repr(best_val_loss),
                "config": json.dumps(config), "hparams": json.dumps(hparams)}
    if base is not None:  # LoRA: params are adapters of this model (what init_from named)
        metadata["base"] = base
    if jax.process_index() == 0:
        weights.write_safetensors(Path(out_dir) / CKPT_NAME, tensors, metadata)


def read_checkpoint_meta(path):
    path = Path(path)
    try:
        with open(path, "rb") as f:
            _, metadata, _ = weights.safetensors_header(f, path)
    except FileNotFoundError:
        raise FileNotFoundError(f"cannot resume: {path} does not exist (train with init_from=scratch or a model "
                                f"first, or give the out_dir of an earlier run)") from None
    if metadata.get("format") != CKPT_FORMAT:
        raise ValueError(f"{path} is not a gptjax training checkpoint (format {metadata.get('format')!r})")
    return {"iter": int(metadata["iter"]), "best_val_loss": float(metadata["best_val_loss"]),
            "config": json.loads(metadata["config"]), "hparams": json.loads(metadata["hparams"]),
            "base": metadata.get("base")}


def load_checkpoint(path, optimizer_for):
    """out_dir/ckpt.safetensors -> (params, opt_state, meta); optimizer_for(params) gives the optimizer whose state
    layout the saved state must match."""
    meta = read_checkpoint_meta(path)
    try:
        tensors = safetensors.numpy.load_file(path)
    except Exception as e:  # the package raises its own error types for damaged files
        raise ValueError(f"{path} is damaged ({e}); restore it or train anew") from None
    params = weights.unflatten({name[len("params/"):]: x for name, x in tensors.items() if name.startswith("params/")})
    template = jax.eval_shape(optimizer_for(params).init, params)
    names = flat_names(template, "opt_state/")
    missing = [name for name in names if name not in tensors]
    if missing:
        raise ValueError(f"{path} lacks optimizer state {missing[0]}: it was written by another version of train.py")
    leaves = []
    for name, shape in names.items():
        if tensors[name].shape != shape.shape:
            raise ValueError(f"{path}: {name} has shape {tensors[name].shape}, expected {shape.shape}")
        leaves.append(tensors[name].astype(shape.dtype))
    opt_state = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(template), leaves)
    return params, opt_state, meta


def flat_names(tree, prefix):  # {prefix + path: leaf}, "/"-joined dict keys (params) or jax's key strings (state)
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if all(isinstance(k, jax.tree_util.DictKey) for k in path):
            name = "/".join(str(k.key) for k in path)
        else:
            name = jax.tree_util.keystr(path)
        out[prefix + name] = leaf
    return out


def host_array(x):  # a (possibly sharded, possibly multi-host) jax array -> numpy
    if jax.process_count() > 1:
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


# ----------------------------------------------------------------------------------------- the model folder


def save_model(out_dir, hparams, params):
    """The params -> out_dir/params.safetensors in weights.py's model-folder format (float32, atomic)."""
    host = jax.tree.map(host_array, params)
    if jax.process_index() == 0:
        weights.save_params(out_dir, hparams, host)


def write_vocabulary(out_dir, dataset_dir):
    """Copy the dataset's vocabulary into out_dir, making it a model folder that main.py can sample from, and remove
    the other kind's files (a character run after a GPT-2 run must not leave encoder.json behind: main.py would
    prefer it)."""
    meta = data.read_meta(dataset_dir)
    if meta["kind"] == "char":
        contents = {"meta.json": json.dumps({"kind": "char", "chars": meta["chars"]}, ensure_ascii=False).encode()}
    else:
        contents = {name: (Path(dataset_dir) / name).read_bytes() for name in data.GPT2_FILES}
    for name in VOCABULARY_FILES:
        path = Path(out_dir) / name
        if name not in contents:
            path.unlink(missing_ok=True)
        elif not path.is_file() or path.read_bytes() != contents[name]:
            data.write_atomic(path, contents[name])


# ------------------------------------------------------------------------------------------------- metrics


def append_metrics(out_dir, record):
    path = Path(out_dir) / "metrics.jsonl"
    try:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
    except OSError as e:
        raise files.cannot_write(path, e) from None


def drop_metrics_after(out_dir, it):
    """Remove the records of iterations after it from metrics.jsonl: a run killed after writing its metrics but before
    its checkpoint repeats those iterations when resumed from it, and would record them twice."""
    records = read_metrics(out_dir)
    kept = [record for record in records if record.get("iter", 0) <= it]
    if len(kept) < len(records):
        with files.atomic_write(Path(out_dir) / "metrics.jsonl") as f:
            f.write("".join(json.dumps(record) + "\n" for record in kept).encode())


def read_metrics(out_dir):  # the records of metrics.jsonl, oldest first (a line cut by a crash is skipped)
    records = []
    with contextlib.suppress(FileNotFoundError), open(Path(out_dir) / "metrics.jsonl") as f:
        for line in f:
            with contextlib.suppress(ValueError):
                records.append(json.loads(line))
    return records


def plot_losses(out_dir):
    """out_dir/loss.png from every evaluation in metrics.jsonl (a resumed run's too), when matplotlib is installed
    (it is optional)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    history = read_metrics(out_dir)
    fig, ax = plt.subplots(figsize=(6, 4))
    for split in ("train", "val"):
        ax.plot([h["iter"] for h in history], [h[f"{split}_loss"] for h in history], marker=".", label=split)
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss (nats per token)")
    ax.legend()
    ax.grid(alpha=0.3)
    with files.atomic_write(Path(out_dir) / "loss.png") as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)
