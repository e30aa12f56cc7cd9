"""What a training run keeps in its out_dir, and the claim on it: checkpoints, the model and its vocabulary, the metrics
and their plot. Every file is written atomically (files.atomic_write: a crash never leaves a half-written file, and the
previous version stays intact until the new one is whole).

    with claimed_out_dir(config):         # a lock a second run meets at once; an earlier run's files cleared
        save_checkpoint(out_dir, state, config, hparams, record)      # state: a RunState
        save_model(out_dir, hparams, params)
    state, meta = load_checkpoint(out_dir / CKPT_NAME)                # its opt_state: the saved tensors, by name
    opt_state = saved_opt_state(state.opt_state, jax.eval_shape(optimizer.init, state.params), ckpt_path)

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
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import jax
import numpy as np
import safetensors.numpy
from jax.experimental import multihost_utils

import data
import encoder
import files
import weights
from cli import UsageError

CKPT_NAME = "ckpt.safetensors"
CKPT_FORMAT = "gptjax-train-1"
VOCABULARY_FILES = ("meta.json", "encoder.json", "vocab.bpe")  # characters, or GPT-2's BPE
RUN_FILES = (CKPT_NAME, "params.safetensors", "metrics.jsonl", "loss.png", *VOCABULARY_FILES)  # what a run writes
TRACKER_FOLDERS = ("tensorboard", "wandb")  # tracking.py's, in out_dir: cleared with an earlier run's files
MARKER = ".gptjax-run"  # written into an out_dir when a run claims it: RUN_FILES there are train.py's to replace


# ------------------------------------------------------------------------------------------------- the claim


def check_out_dir(config):
    """A run must not replace files that train.py did not write, nor, unless it continues out_dir's model
    (init_from=resume) or is told to (overwrite), a trained model."""
    if not str(config["out_dir"]).strip():
        raise UsageError("out_dir is empty: give the folder for the run's checkpoints and model, e.g. --out_dir=out")
    out_dir = Path(config["out_dir"])
    present = sorted(p.name for p in out_dir.iterdir() if p.name != ".lock") if out_dir.is_dir() else []
    if config["init_from"] == "resume" or config["eval_only"]:  # they need out_dir's checkpoint, or write nothing
        present = [name for name in present if name in RUN_FILES]
    if present and not is_run_folder(out_dir):
        shown = ", ".join(present[:3]) + (f" and {len(present) - 3} more" if len(present) > 3 else "")
        raise FileExistsError(f"{out_dir} holds {shown}, which train.py did not write: give a new or empty --out_dir "
                              f"(a run replaces only the files of an earlier run)")
    if config["init_from"] == "resume" or config["overwrite"]:
        return
    for name in (CKPT_NAME, "params.safetensors"):
        if (out_dir / name).exists():
            raise FileExistsError(f"{out_dir} already holds a trained model ({name}): continue it with "
                                  f"--init_from=resume, train into another --out_dir, or replace it with --overwrite")


def is_run_folder(out_dir):  # a folder that train.py has claimed (or, from before the marker, holds its checkpoint)
    if (out_dir / MARKER).is_file():
        return True
    try:
        read_checkpoint_meta(out_dir / CKPT_NAME)
    except (OSError, ValueError):
        return False
    return True


@contextlib.contextmanager
def claimed_out_dir(config):
    """Hold out_dir for the run: a lock that a second train.py on the same folder meets at once (the system drops it
    when this process ends, however it ends), the folder marked as a run's, the temporary files of a killed run
    removed, and for a resumed run the metrics recorded after its checkpoint (which it repeats) dropped. A new run
    then calls clear_previous_run once it knows it can start."""
    out_dir = Path(config["out_dir"])
    out_dir.mkdir(parents=True, exist_ok=True)
    with files.locked(out_dir / ".lock", busy=f"{out_dir} is in use by another train.py: wait for it to end, or "
                                               f"give another --out_dir"):
        check_out_dir(config)  # again, now that no other run can write there
        for name in RUN_FILES:  # a planted link is refused now, not at the first evaluation that would write there
            files.refuse_link(out_dir / name)
        files.remove_stale_temporaries(out_dir)
        with files.atomic_write(out_dir / MARKER) as f:  # every time: an out_dir that cannot be written fails now
            f.write(b"a train.py out_dir: its checkpoints, model, vocabulary, metrics.jsonl and loss.png\n")
        if config["init_from"] == "resume":
            drop_metrics_after(out_dir, read_checkpoint_meta(out_dir / CKPT_NAME)["iter"])
        yield


def clear_previous_run(out_dir):
    """Remove an earlier run's files (check_out_dir made sure they are train.py's) and its trackers' folders
    (tensorboard/, wandb/), so that none mixes with this run's. Called once the new run has passed every check: a run
    that cannot start leaves the old one intact. A file or link in a tracker folder's place is not ours: left alone."""
    for name in RUN_FILES:
        (Path(out_dir) / name).unlink(missing_ok=True)
    for name in TRACKER_FOLDERS:
        path = Path(out_dir) / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)


# ------------------------------------------------------------------------------------------------- checkpoints


@dataclass
class RunState:
    """What a training run carries from one step to the next, and what its checkpoint keeps (with the config)."""
    params: dict                     # what trains: the model's params, or with LoRA its adapters
    opt_state: object                # the optimizer's state (as loaded: the saved tensors by name, see saved_opt_state)
    iter: int                        # the iteration to run next
    best_val_loss: float             # the best validation loss so far (inf before any)
    run_id: str                      # the trackers' run, the same across resumes
    frozen: dict | None = None       # LoRA's base model (not trained), else None
    lora_scale: float | None = None  # LoRA's lora_alpha / lora_rank, else None


def save_checkpoint(out_dir: Path, state: RunState, config: dict, hparams: dict, record: dict,
                    eval_pending: bool = False) -> None:
    """The whole training state -> out_dir/ckpt.safetensors, atomically (a crash or a full disk leaves the previous
    checkpoint as it was). record: what the state is valid with, checked on resume: {"vocabulary": the dataset's
    meta.json, and with LoRA "base" (a release name or an absolute folder) and "base_fingerprint"}. eval_pending: a
    stop cut short the evaluation due at state.iter; a resume redoes it first."""
    tensors = {name: host_array(x) for name, x in {**flat_names(state.params, "params/"),
                                                    **flat_names(state.opt_state, "opt_state/")}.items()}
    metadata = {"format": CKPT_FORMAT, "iter": str(state.iter), "best_val_loss": repr(state.best_val_loss),
                "config": json.dumps(absolute_paths(config)), "hparams": json.dumps(hparams),
                "vocabulary": json.dumps(record["vocabulary"], ensure_ascii=False), "run_id": state.run_id}
    if record.get("base") is not None:  # LoRA: params are adapters of this model
        metadata["base"], metadata["base_fingerprint"] = record["base"], record["base_fingerprint"]
    if eval_pending:
        metadata["eval_pending"] = "true"
    if jax.process_index() == 0:
        weights.write_safetensors(Path(out_dir) / CKPT_NAME, tensors, metadata)


def absolute_paths(config):  # the config with its folders made absolute: a resume from elsewhere finds the same ones
    paths = {key: str(Path(config[key]).resolve()) for key in ("data_dir", "models_dir", "out_dir")}
    dataset = config["dataset"]
    if dataset not in data.NAMED and Path(dataset).exists():  # a path to text, not a name
        paths["dataset"] = str(Path(dataset).resolve())
    return {**config, **paths}


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
    try:
        meta = {"iter": int(metadata["iter"]), "best_val_loss": float(metadata["best_val_loss"]),
                "config": json.loads(metadata["config"]), "hparams": json.loads(metadata["hparams"]),
                "vocabulary": json.loads(metadata.get("vocabulary", "null")), "base": metadata.get("base"),
                "base_fingerprint": metadata.get("base_fingerprint"), "run_id": metadata.get("run_id"),
                "eval_pending": metadata.get("eval_pending") == "true"}
        if not isinstance(meta["config"], dict):
            raise TypeError("config is not a table")
        weights.checked_hparams(meta["hparams"], path)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ValueError(f"{path} has damaged metadata ({e}); restore it or train anew") from None
    return meta


def load_checkpoint(path) -> tuple[RunState, dict]:
    """out_dir/ckpt.safetensors -> (its RunState, its metadata). The state's opt_state is the saved tensors by name:
    the optimizer's structure is the optimizer's (saved_opt_state rebuilds it where the optimizer is made)."""
    meta = read_checkpoint_meta(path)
    try:
        tensors = safetensors.numpy.load_file(path)
    except Exception as e:  # the package raises its own error types for damaged files
        raise ValueError(f"{path} is damaged ({e}); restore it or train anew") from None
    with open(path, "rb") as f:
        _, metadata, _ = weights.safetensors_header(f, path)
    weights.verify_checksums(path, tensors, metadata)
    flat = {name[len("params/"):]: x for name, x in tensors.items() if name.startswith("params/")}
    check_params_fit(flat, meta["hparams"], path, lora=meta["base"] is not None)
    opt_state = {name: x for name, x in tensors.items() if name.startswith("opt_state/")}
    state = RunState(weights.unflatten(flat), opt_state, meta["iter"], meta["best_val_loss"], meta["run_id"])
    return state, meta


def saved_opt_state(saved: dict, template, path):
    """The saved optimizer tensors ({name: array}) in the structure of template (jax.eval_shape of the optimizer's
    init), each checked against its shape: a checkpoint of another optimizer or version is refused in one line."""
    names = flat_names(template, "opt_state/")
    missing = [name for name in names if name not in saved]
    if missing:
        raise ValueError(f"{path} lacks optimizer state {missing[0]}: it was written by another version of train.py")
    leaves = []
    for name, shape in names.items():
        if saved[name].shape != shape.shape:
            raise ValueError(f"{path}: {name} has shape {saved[name].shape}, expected {shape.shape}")
        leaves.append(saved[name].astype(shape.dtype))
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(template), leaves)


def legacy_vocabulary(out_dir, tokens):  # a checkpoint from before checkpoints named their vocabulary
    if tokens == "char" and (out_dir / "meta.json").is_file():
        return json.loads((out_dir / "meta.json").read_text(encoding="utf-8"))
    return {"kind": tokens}  # its width is still checked against the model's (data.check_vocabulary)


def check_params_fit(flat, hparams, path, lora):
    """The checkpoint's params (or LoRA adapters) must have the shapes its hparams give: a resume must not train, and
    then save, a model that main.py would call damaged."""
    shapes = weights.param_shapes(hparams)
    for name, x in flat.items():
        if lora:  # "h/attn/c_attn/lora_a": [n_layer, n_in, rank]; lora_b: [n_layer, rank, n_out]
            target, leaf = name.rsplit("/", 1)
            w = shapes.get(f"{target}/w")
            want = w and ((*w[:2], x.shape[-1]) if leaf == "lora_a" else (w[0], x.shape[1], w[2]))
        else:
            want = shapes.get(name)
        if want is None or tuple(x.shape) != tuple(want):
            raise ValueError(f"{path}: {name} has shape {list(x.shape)} where its hparams give "
                             f"{list(want) if want else 'no such tensor'}: the checkpoint is damaged or was edited")
    missing = [name for name in shapes if not lora and name not in flat and not name.endswith("/b")]
    if missing:
        raise ValueError(f"{path} lacks params/{missing[0]}: the checkpoint is damaged or was edited")


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


def save_model(out_dir: Path, hparams: dict, params: dict) -> None:
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
        source = Path(dataset_dir) if (Path(dataset_dir) / "encoder.json").is_file() else encoder.GPT2_VOCAB  # shards
        contents = {name: (source / name).read_bytes() for name in encoder.GPT2_FILES}
    for name in VOCABULARY_FILES:
        path = Path(out_dir) / name
        if name not in contents:
            path.unlink(missing_ok=True)
        elif not path.is_file() or path.read_bytes() != contents[name]:
            data.write_atomic(path, contents[name])


# ------------------------------------------------------------------------------------------------- metrics


def append_metrics(out_dir: Path, record: dict) -> None:
    with files.appending(Path(out_dir) / "metrics.jsonl") as f:
        f.write(json.dumps(record) + "\n")


def drop_metrics_after(out_dir, it):
    """Remove the records of iterations after it from metrics.jsonl: a run killed after writing its metrics but before
    its checkpoint repeats those iterations when resumed from it, and would record them twice."""
    records = read_metrics(out_dir)
    kept = [record for record in records if record.get("iter", 0) <= it]
    if len(kept) < len(records):
        with files.atomic_write(Path(out_dir) / "metrics.jsonl") as f:
            f.write("".join(json.dumps(record) + "\n" for record in kept).encode())


def read_metrics(out_dir: Path) -> list[dict]:
    # the records of metrics.jsonl, oldest first (a line cut by a crash is skipped)
    records = []
    with contextlib.suppress(FileNotFoundError), open(Path(out_dir) / "metrics.jsonl") as f:
        for line in f:
            with contextlib.suppress(ValueError):
                records.append(json.loads(line))
    return records


def plot_losses(out_dir):
    """out_dir/loss.png from every evaluation in metrics.jsonl (a resumed run's too), when matplotlib is installed
    (it is optional). A picture never stops a run: one that cannot be written (a full disk, say) is a warning."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    try:
        draw_losses(plt, read_metrics(out_dir), Path(out_dir) / "loss.png")
    except (OSError, ValueError, RuntimeError) as e:  # matplotlib's own failures are ValueError or RuntimeError
        print(f"warning: loss.png was not updated ({e}); training goes on", file=sys.stderr, flush=True)


def draw_losses(plt, history, path):
    fig, ax = plt.subplots(figsize=(6, 4))
    for split in ("train", "val"):
        ax.plot([h["iter"] for h in history], [h[f"{split}_loss"] for h in history], marker=".", label=split)
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss (nats per token)")
    ax.legend()
    ax.grid(alpha=0.3)
    try:
        with files.atomic_write(path) as f:
            fig.savefig(f, format="png", dpi=100)
    finally:
        plt.close(fig)
