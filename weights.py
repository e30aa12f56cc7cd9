"""GPT-2's weights: download OpenAI's release, read its TensorFlow checkpoint with numpy alone, read Hugging Face
safetensors, and cache the result.

    encoder, hparams, params = load_encoder_hparams_and_params("124M", models_dir="models")
    hparams, params = load_hparams_and_params("path/to/folder")

A model is a release size ("124M", "355M", "774M", "1558M"), fetched into `models_dir/<size>/` the first time, or a
folder in one of two layouts:
  - OpenAI's release: hparams.json, model.ckpt.index + model.ckpt.data-00000-of-00001 (a TensorFlow tensor bundle),
    encoder.json, vocab.bpe (checkpoint and model.ckpt.meta come with the release but are not needed);
  - Hugging Face's GPT-2 (gpt2, distilgpt2, a finetune of them): config.json + model.safetensors;
  - gptjax's own: params.safetensors with the hparams in its metadata (written by train.py and `save_params`).
params come out in gpt.py's layout: the n_layer blocks stacked on a leading axis, as jax arrays. The first load
converts the weights and writes them beside the source as params.safetensors; later loads read that file straight
into arrays (124M: a fraction of a second). The cache records the size and mtime of the files it was made from and is
remade when they change.

Tokenizer: the encoder comes from the model's folder. A Hugging Face folder saved without its tokenizer (no
encoder.json, vocab.bpe, vocab.json, merges.txt or meta.json) gets GPT-2's own vocabulary, shipped in vocab/.

Releases come from `$GPTJAX_BASE_URL/models/<size>/<file>` (default: OpenAI's public bucket) through download.py,
each file checked for its kind before it is renamed into place; tf_checkpoint.py reads the TensorFlow checkpoint.
"""
import argparse
import contextlib
import hashlib
import json
import os
import re
import sys
import warnings
from pathlib import Path

import jax
import ml_dtypes
import numpy as np

import cli
import encoder
import files
import quant
from download import download
from files import Damaged
from tf_checkpoint import bundle_tensor, checkpoint_prefix, crc32c, parse_proto, read_bundle_index, read_table

MODEL_SIZES = ("124M", "355M", "774M", "1558M")
RELEASE_FILES = ("checkpoint", "encoder.json", "hparams.json", "model.ckpt.data-00000-of-00001", "model.ckpt.index",
                 "model.ckpt.meta", "vocab.bpe")
LOADING_FILES = ("hparams.json", "model.ckpt.index", "model.ckpt.data-00000-of-00001", "encoder.json", "vocab.bpe")
TOKENIZER_FILES = ("encoder.json", "vocab.bpe", "vocab.json", "merges.txt", "meta.json")
DEFAULT_BASE_URL = "https://openaipublic.blob.core.windows.net/gpt-2"
CACHE_NAME = "params.safetensors"
CACHE_FORMAT = "gptjax-params-1"  # bump when the cache's layout changes, so that old caches are remade


# ------------------------------------------------------------------------------------------------ OpenAI's release

def base_url():
    return os.environ.get("GPTJAX_BASE_URL", DEFAULT_BASE_URL).rstrip("/")


# The most a release file can be, where no other file tells (the data file's size is its index's; the vocabulary's,
# its shipped copy's): a server streaming more is stopped there. 1558M's index is ~25 KB and its graph ~2 MB.
RELEASE_FILE_BYTES = {"checkpoint": 4096, "hparams.json": 4096, "model.ckpt.index": 1 << 20,
                      "model.ckpt.meta": 64 << 20}


def release_file_limit(folder, name):  # -> the most bytes release file `name` can have
    if name in encoder.GPT2_FILES:
        return (encoder.GPT2_VOCAB / name).stat().st_size
    if ".data-" in name and (folder / "model.ckpt.index").exists():
        entries, _ = read_bundle_index(folder / "model.ckpt.index")
        return max((e["offset"] + e["size"] for e in entries.values()), default=0)
    return RELEASE_FILE_BYTES.get(name)


def release_file_check(folder, name):
    """What a file of OpenAI's release must look like before it is renamed into place -> check(path), raising
    ValueError: GPT-2's vocabulary byte for byte (every release has the same, shipped in vocab/), JSON that parses,
    a tensor bundle's index table, data of the length that the index gives."""
    def check(path):
        if name in encoder.GPT2_FILES:
            if path.read_bytes() != (encoder.GPT2_VOCAB / name).read_bytes():
                raise ValueError(f"it differs from GPT-2's {name}, which every release shares (vocab/{name})")
        elif name.endswith(".json"):
            if not isinstance(json.loads(path.read_bytes()), dict):
                raise ValueError("not a JSON object")
        elif name == "checkpoint":
            if b"model_checkpoint_path" not in path.read_bytes()[:4096]:
                raise ValueError("no model_checkpoint_path")
        elif name.endswith(".index"):
            read_table(path.read_bytes())
        elif ".data-" in name and (folder / "model.ckpt.index").exists():
            end = release_file_limit(folder, name)  # the index's end of the data
            if path.stat().st_size != end:
                raise ValueError(f"{path.stat().st_size:,} bytes where the index gives {end:,}")
        elif name.endswith(".meta"):
            parse_proto(path.read_bytes())
    return check


def download_release(model_type: str, folder: Path, names: tuple[str, ...] = RELEASE_FILES) -> None:
    """Fetch the files of OpenAI's GPT-2 release `model_type` that folder lacks. A file exists only once it has
    arrived whole and looks right (see download), so a folder holding all of them is complete and is never fetched
    again. One process downloads into a folder at a time; another waits for it, then fetches only what is still
    missing."""
    folder = Path(folder)
    missing = [name for name in names if not (folder / name).exists()]
    if not missing:
        return
    folder.mkdir(parents=True, exist_ok=True)
    with files.locked(folder / ".download.lock", waiting=f"waiting for another process downloading into {folder}"):
        # the index before the data file: the data's length is checked against it
        for name in sorted(missing, key=lambda name: ".data-" in name):
            if (folder / name).exists():  # fetched meanwhile by the process we waited for
                continue
            url = f"{base_url()}/models/{model_type}/{name}"
            try:
                download(url, folder / name, release_file_check(folder, name), release_file_limit(folder, name))
            except FileNotFoundError as e:
                raise FileNotFoundError(f"{e}: is {model_type!r} one of the releases {', '.join(MODEL_SIZES)}, and "
                                        f"is GPTJAX_BASE_URL (if set) right?") from None
            except ConnectionError as e:
                raise ConnectionError(f"{e}; check the network, or place the files {', '.join(names)} in {folder}/ "
                                      f"by hand") from None


# ------------------------------------------------------------------------------------ params layout and conversion

def param_shapes(hparams: dict) -> dict[str, tuple[int, ...]]:
    # "/"-joined names of gpt.py's params -> shapes; "h/..." are stacked over the layers
    V, C, E, L = hparams["n_vocab"], hparams["n_ctx"], hparams["n_embd"], hparams["n_layer"]
    return {"wte": (V, E), "wpe": (C, E),
            "h/ln_1/g": (L, E), "h/ln_1/b": (L, E),
            "h/attn/c_attn/w": (L, E, 3 * E), "h/attn/c_attn/b": (L, 3 * E),
            "h/attn/c_proj/w": (L, E, E), "h/attn/c_proj/b": (L, E),
            "h/ln_2/g": (L, E), "h/ln_2/b": (L, E),
            "h/mlp/c_fc/w": (L, E, 4 * E), "h/mlp/c_fc/b": (L, 4 * E),
            "h/mlp/c_proj/w": (L, 4 * E, E), "h/mlp/c_proj/b": (L, E),
            "ln_f/g": (E,), "ln_f/b": (E,)}


def stack_params(hparams, read):
    """Gather params tensor by tensor with read(name, layer or None, shape) -> float32 array of that shape. Only the
    output and one source tensor are in memory at a time."""
    flat = {}
    for name, shape in param_shapes(hparams).items():
        if name.startswith("h/"):
            flat[name] = np.empty(shape, np.float32)
            for layer in range(shape[0]):
                flat[name][layer] = read(name, layer, shape[1:])
        else:
            flat[name] = read(name, None, shape)
    return flat


def checked_shape(array, path, name, shape):  # a source tensor reshaped to shape; TF's matrices have a leading 1
    if array.shape[array.ndim - len(shape):] != shape or array.size != int(np.prod(shape)):
        raise ValueError(f"{path}: tensor {name} has shape {list(array.shape)} where the hparams give {list(shape)}")
    if not np.isfinite(array).all():  # a model that would generate "!!!!!!!!" for ever
        raise ValueError(f"{path}: tensor {name} holds NaN or infinite values: these weights cannot be used")
    return array.reshape(shape)


def tf_name(name, layer):  # "h/attn/c_attn/w", 3 -> "model/h3/attn/c_attn/w"
    return "model/" + (name if layer is None else f"h{layer}" + name[1:])


def hf_name(name, layer):  # "h/ln_1/g", 3 -> "h.3.ln_1.weight"; "wte" -> "wte.weight"
    parts = name.split("/")
    if layer is not None:
        parts[0] = f"h.{layer}"
    leaf = {"g": "weight", "w": "weight", "b": "bias"}.get(parts[-1])
    return ".".join(parts[:-1] + [leaf] if leaf else parts + ["weight"])


def read_tf_params(folder, hparams):  # OpenAI's checkpoint -> flat stacked params (np.float32)
    prefix = checkpoint_prefix(folder)
    index = folder / f"{prefix}.index"
    entries, n_shards = read_bundle_index(index)
    check_layer_count(entries, r"model/h(\d+)/", hparams, folder / "hparams.json", index)
    paths = [folder / f"{prefix}.data-{i:05d}-of-{n_shards:05d}" for i in range(n_shards)]
    require_files(folder, paths)
    used = set()
    with contextlib.ExitStack() as stack:
        data_files = [stack.enter_context(open(p, "rb")) for p in paths]

        def read(name, layer, shape):
            tensor = tf_name(name, layer)
            if tensor not in entries:
                raise ValueError(f"{index} has no tensor {tensor}; is it a GPT-2 checkpoint?")
            entry = entries[tensor]
            used.add(tensor)
            return checked_shape(bundle_tensor(data_files[entry["shard"]], paths[entry["shard"]], tensor, entry),
                                 index, tensor, shape)
        flat = stack_params(hparams, read)
    # a TensorFlow finetune may also hold its optimizer's slots and step counter: those are not weights
    check_all_used([name for name in entries if name.startswith("model/") and "/Adam" not in name], used, index,
                   folder / "hparams.json")
    return flat


def read_hf_params(folder, hparams):  # Hugging Face's model.safetensors -> flat stacked params (np.float32)
    path = folder / "model.safetensors"
    used = set()
    with open(path, "rb") as f:
        tensors, _, start = safetensors_header(f, path)
        check_layer_count(tensors, r"(?:transformer\.)?h\.(\d+)\.", hparams, folder / "config.json", path)
        prefix = "transformer." if "transformer.wte.weight" in tensors else ""  # some files drop the prefix

        def read(name, layer, shape):
            tensor = prefix + hf_name(name, layer)
            if tensor not in tensors:
                raise ValueError(f"{path} has no tensor {tensor}; is it a GPT-2 model?")
            used.add(tensor)
            return checked_shape(safetensor(f, path, start, tensors[tensor]), path, tensor, shape)
        flat = stack_params(hparams, read)
    # not weights: older files' causal-mask buffers, and the LM head that config.json ties to wte
    buffers = re.compile(r"(.*\.)?attn\.(masked_)?bias$|(.*\.)?lm_head\.weight$")
    check_all_used([name for name in tensors if not buffers.match(name)], used, path, folder / "config.json")
    return flat


def check_layer_count(names, pattern, hparams, config_path, weights_path):
    """The config's n_layer must be the number of blocks the weights hold: neither a truncated model nor an error
    that blames the weights for a wrong config."""
    layers = sorted({int(m.group(1)) for name in names if (m := re.match(pattern, name))})
    if len(layers) != hparams["n_layer"] or layers != list(range(len(layers))):  # no list of n_layer: it may be 10^9
        held = f"{len(layers)} blocks" if layers == list(range(len(layers))) else f"the blocks {layers}"
        raise ValueError(f"{config_path} gives n_layer {hparams['n_layer']} but {weights_path} holds {held}: the "
                         f"config does not match the weights")


def check_all_used(names, used, weights_path, config_path):  # every weight in the file went into the params
    unused = sorted(set(names) - used)
    if unused:
        raise ValueError(f"{weights_path} holds {unused[0]}{f' and {len(unused) - 1} more' if len(unused) > 1 else ''}"
                         f", which a GPT-2 of the shape in {config_path} does not have: the config does not match "
                         f"the weights")


# ------------------------------------------------------------------------------------------------- safetensors
# The format is 8 bytes of header length, a JSON header ({name: {dtype, shape, data_offsets}, "__metadata__": {}}),
# then the raw tensors. It is read here rather than with the safetensors package because each tensor is then read
# with one readinto into a 64-byte-aligned buffer, which jax on CPU adopts without a copy: a load holds one copy of
# the weights and takes ~0.1 s for 124M (the package's safe_open: ~0.7 s and a transient second copy).

SAFETENSORS_DTYPES = {"F32": np.dtype("<f4"), "F64": np.dtype("<f8"), "F16": np.dtype("<f2"),
                      "BF16": np.dtype(ml_dtypes.bfloat16), "I8": np.dtype("i1")}  # I8: quant.py's int8 matrices


def safetensors_header(f, path):  # -> ({name: {dtype, shape, data_offsets}}, metadata, offset of the data)
    try:
        length = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(length)) if length < 1 << 30 else None
        metadata = header.pop("__metadata__", None) or {}
        ends = [info["data_offsets"][1] for info in header.values()]
    except (ValueError, TypeError, AttributeError, KeyError, IndexError):
        raise Damaged(path, "no safetensors header") from None
    if 8 + length + max(ends, default=0) > os.fstat(f.fileno()).st_size:
        raise Damaged(path, "truncated")
    return header, metadata, 8 + length


def safetensor(f, path, start, info, crc=None):  # one tensor -> float32 array (no copy when stored so), or int8 as such
    if info["dtype"] not in SAFETENSORS_DTYPES:
        raise ValueError(f"{path}: tensors of dtype {info['dtype']} are not supported (use F32, F16, BF16 or F64)")
    begin, end = info["data_offsets"]
    buf = empty_aligned(end - begin)
    f.seek(start + begin)
    if f.readinto(buf) != end - begin:
        raise Damaged(path, "truncated")
    if crc is not None and crc32c(buf) != crc:  # gptjax's own files carry a checksum per tensor
        raise Damaged(path, "a tensor fails its checksum")
    array = buf.view(SAFETENSORS_DTYPES[info["dtype"]]).reshape(info["shape"])
    return array if array.dtype == np.int8 else array.astype(np.float32, copy=False)


def empty_aligned(nbytes):  # [nbytes] uint8 at a 64-byte boundary, which lets jax on CPU adopt it instead of copying
    raw = np.empty(nbytes + 64, np.uint8)
    start = -raw.ctypes.data % 64
    return raw[start:start + nbytes]


def write_safetensors(path, tensors, metadata):  # {name: numpy array}, {str: str} -> path, atomically
    # each array keeps its dtype (float32 params, int32 counters); files.atomic_write: a crash leaves path as it was;
    # the metadata's "crc32c" holds each tensor's checksum (google-crc32c: ~12 GB/s), which gptjax's readers verify
    tensors = {name: np.asarray(array, order="C") for name, array in tensors.items()}  # 0-d stays 0-d
    metadata = {**metadata, "crc32c": json.dumps({name: crc32c(array) for name, array in tensors.items()})}
    dtypes = {np.dtype(d): name for name, d in SAFETENSORS_DTYPES.items()} | {np.dtype("<i4"): "I32",
                                                                             np.dtype("<i8"): "I64"}
    header, offset = {"__metadata__": metadata}, 0
    for name, array in tensors.items():
        header[name] = {"dtype": dtypes[np.dtype(array.dtype)], "shape": list(array.shape),
                        "data_offsets": [offset, offset + array.nbytes]}
        offset += array.nbytes
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)  # the format asks for the data to start 8-byte aligned
    with files.atomic_write(path) as f:
        f.write(len(blob).to_bytes(8, "little") + blob)
        for array in tensors.values():
            f.write(memoryview(array).cast("B"))


def checksums(path, metadata):  # {tensor name: crc32c} that write_safetensors recorded ({} in others' files)
    try:
        return {name: int(crc) for name, crc in json.loads(metadata.get("crc32c", "{}")).items()}
    except (ValueError, TypeError, AttributeError):
        raise Damaged(path, "its checksums are unreadable") from None


def verify_checksums(path, tensors, metadata):  # tensors read by another reader (safetensors.numpy), checked
    for name, crc in checksums(path, metadata).items():
        if name in tensors and crc32c(np.asarray(tensors[name], order="C")) != crc:
            raise Damaged(path, f"{name} fails its checksum")


# ------------------------------------------------------------------------------------------------ model folders

def require_files(folder, paths):
    missing = [p.name for p in paths if not p.exists()]
    if missing:
        raise FileNotFoundError(f"{folder} lacks {', '.join(missing)}")


def read_json(path):  # a JSON object's contents, or a one-line error naming path
    try:
        value = json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path} should hold a JSON object, not a {type(value).__name__}")
    return value


def checked_hparams(hparams, path):
    for key in ("n_vocab", "n_ctx", "n_embd", "n_head", "n_layer"):
        if not isinstance(hparams.get(key), int) or isinstance(hparams[key], bool) or hparams[key] <= 0:
            raise ValueError(f"{path}: {key} must be a positive integer, got {hparams.get(key)!r}")
    if hparams["n_embd"] % hparams["n_head"]:
        raise ValueError(f"{path}: n_embd {hparams['n_embd']} is not a multiple of n_head {hparams['n_head']}")
    return {key: hparams[key] for key in ("n_vocab", "n_ctx", "n_embd", "n_head", "n_layer")}


def hf_hparams(path):  # config.json -> hparams, refusing the variants that gpt.py does not compute
    config = read_json(path)
    fixes = {"model_type": "gpt2", "activation_function": ("gelu_new", "gelu_pytorch_tanh"),
             "layer_norm_epsilon": 1e-5, "n_inner": (None, 4 * config.get("n_embd", 0)),
             "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False, "tie_word_embeddings": True}
    for key, allowed in fixes.items():
        allowed = allowed if isinstance(allowed, tuple) else (allowed,)
        if key in config and config[key] not in allowed:
            raise ValueError(f"{path}: {key} {config[key]!r} is not GPT-2's ({' or '.join(map(repr, allowed))}), "
                             f"which is all that gpt.py computes")
    names = {"n_vocab": "vocab_size", "n_ctx": "n_positions", "n_embd": "n_embd", "n_head": "n_head",
             "n_layer": "n_layer"}
    return checked_hparams({key: config.get(name) for key, name in names.items()}, path)


def model_sources(folder):  # -> (reader, hparams, the files the weights are made from)
    """Which layout folder is in, its hparams, and its weight files; a one-line error names any that are missing."""
    if not folder.is_dir():
        raise FileNotFoundError(f"model folder {folder} does not exist")
    prefix = checkpoint_prefix(folder)
    if (folder / "hparams.json").exists() or (folder / f"{prefix}.index").exists():
        index = folder / f"{prefix}.index"
        data = sorted(folder.glob(f"{prefix}.data-*-of-*")) or [folder / f"{prefix}.data-00000-of-00001"]
        require_files(folder, [folder / "hparams.json", index, *data])
        hparams = checked_hparams(read_json(folder / "hparams.json"), folder / "hparams.json")
        return read_tf_params, hparams, [folder / "hparams.json", index, *data]
    if (folder / "config.json").exists() or (folder / "model.safetensors").exists():
        if not (folder / "model.safetensors").exists() and (folder / "pytorch_model.bin").exists():
            raise FileNotFoundError(f"{folder} has pytorch_model.bin but no model.safetensors: convert it, e.g. with "
                                    f"transformers: GPT2LMHeadModel.from_pretrained(folder).save_pretrained(folder)")
        require_files(folder, [folder / "config.json", folder / "model.safetensors"])
        sources = [folder / "config.json", folder / "model.safetensors"]
        return read_hf_params, hf_hparams(folder / "config.json"), sources
    if (folder / CACHE_NAME).exists():  # gptjax's own layout: what train.py and save_params write
        with open(folder / CACHE_NAME, "rb") as f:
            _, metadata, _ = safetensors_header(f, folder / CACHE_NAME)
        if "hparams" not in metadata:
            raise ValueError(f"{folder / CACHE_NAME} has no hparams in its metadata: it was not written by gptjax")
        return None, checked_hparams(json.loads(metadata["hparams"]), folder / CACHE_NAME), [folder / CACHE_NAME]
    if (folder / "ckpt.safetensors").exists():
        raise FileNotFoundError(f"{folder} holds a training checkpoint (ckpt.safetensors) but not its model "
                                f"(params.safetensors): write it with python train.py --init_from=resume "
                                f"--out_dir={folder} --max_iters=<a larger one>, or restore params.safetensors")
    raise FileNotFoundError(f"{folder} holds no GPT-2 model: expected hparams.json + model.ckpt.index + "
                            f"model.ckpt.data-00000-of-00001 (OpenAI's layout) or config.json + model.safetensors "
                            f"(Hugging Face's) or params.safetensors (gptjax's)")


def sources_stamp(paths):  # identifies the versions of the source files, to tell when the cache is stale
    return json.dumps({p.name: [p.stat().st_size, p.stat().st_mtime_ns, sampled_digest(p)] for p in paths},
                      sort_keys=True)


def sampled_digest(path, n_samples=16, sample_bytes=1 << 16):
    """A hash of 16 blocks of 64 KiB spread over the file, its first and last included: new weights copied in with
    the same size and time (cp -p, an archive, a sync) change it, for reading ~1 MB instead of the whole file."""
    size, digest = path.stat().st_size, hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for i in range(n_samples):
            f.seek(max(0, size - sample_bytes) * i // (n_samples - 1))
            digest.update(f.read(sample_bytes))
    return digest.hexdigest()


def cache_is_current(cache, stamp):
    try:
        with open(cache, "rb") as f:
            _, metadata, _ = safetensors_header(f, cache)
    except (OSError, ValueError):  # absent, or damaged: remake it
        return False
    return metadata.get("format") == CACHE_FORMAT and metadata.get("sources") == stamp


def fingerprint(params: dict) -> str:
    """A hash of the params' values (float32, in name order): tells one model from another of the same shape, as a
    LoRA checkpoint must of its base. ~1 GB/s: 0.5 s for 124M, 6 s for 1558M."""
    digest = hashlib.blake2b(digest_size=16)
    for name, x in sorted(flatten(params).items()):
        digest.update(name.encode())
        digest.update(memoryview(np.ascontiguousarray(x)).cast("B"))
    return digest.hexdigest()


def to_device(array, dtype):  # np.float32 -> jax array of dtype (float32 when None); int8 stays int8
    # Waiting for the copy lets the host buffer go before the next tensor is read: without it the copies queue up and
    # the host holds up to a second copy of the weights.
    keep = dtype is None or array.dtype == np.int8
    return jax.device_put(array if keep else array.astype(dtype, copy=False)).block_until_ready()


def flatten(params: dict) -> dict[str, np.ndarray]:  # {"h": {"ln_1": {"g": x}}} -> {"h/ln_1/g": x as np.float32}
    # (quant.py's int8 matrices stay int8: {"h/attn/c_attn/w/int8": ..., ".../scale": ...})
    return {"/".join(k.key for k in path): np.asarray(x, None if x.dtype == np.int8 else np.float32)
            for path, x in jax.tree_util.tree_flatten_with_path(params)[0]}


def params_metadata(hparams: dict, flat: dict, **more) -> dict:  # the metadata of a params.safetensors
    quantized = {"quantized": "int8"} if any(name.endswith("/int8") for name in flat) else {}
    return {"format": CACHE_FORMAT, "hparams": json.dumps(hparams), **quantized, **more}


def stored_quantized(folder: Path) -> bool:  # whether folder holds gptjax's params.safetensors of an int8 model
    try:
        with open(folder / CACHE_NAME, "rb") as f:
            return safetensors_header(f, folder / CACHE_NAME)[1].get("quantized") == "int8"
    except (OSError, ValueError):
        return False


def unflatten(flat: dict) -> dict:  # {"h/ln_1/g": x, ...} -> {"h": {"ln_1": {"g": x}}, ...}
    tree = {}
    for name, value in flat.items():
        *path, leaf = name.split("/")
        node = tree
        for key in path:
            node = node.setdefault(key, {})
        node[leaf] = value
    return tree


def read_params(path, hparams, dtype=None):
    """params.safetensors -> params (jax arrays), one tensor in host memory at a time, each checked against the shapes
    that hparams give (train.py's models may have no biases)."""
    shapes = param_shapes(hparams)
    with open(path, "rb") as f:
        tensors, metadata, start = safetensors_header(f, path)
        if metadata.get("quantized") == "int8":
            shapes = quant.stored_shapes(shapes)
        crcs = checksums(path, metadata)
        for name, info in tensors.items():
            if name not in shapes:
                raise Damaged(path, f"it holds {name}, which is no GPT-2 weight")
            if tuple(info["shape"]) != shapes[name]:
                raise Damaged(path, f"{name} has shape {info['shape']} where its hparams give {list(shapes[name])}")
        missing = [name for name in shapes if name not in tensors and not name.endswith("/b")]
        if missing:
            raise Damaged(path, f"it lacks {missing[0]}")
        return unflatten({name: to_device(safetensor(f, path, start, info, crcs.get(name)), dtype)
                          for name, info in tensors.items()})


def cache_path(folder: Path, name: str = CACHE_NAME) -> Path:
    """Where the converted weights of an OpenAI or HF folder are kept: in gptjax's own cache ($GPTJAX_CACHE, else
    ~/.cache/gptjax), keyed by the folder's absolute path, never in the folder (a user's, maybe shared or read-only:
    the cache is the model's size, 6 GB for 1558M). The cache records its sources' sizes, times and sampled digests
    (sources_stamp)."""
    root = Path(os.environ.get("GPTJAX_CACHE") or Path.home() / ".cache" / "gptjax") / "converted"
    key = hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:16]
    return root / f"{folder.resolve().name}-{key}" / name


def make_cache_folder(cache: Path) -> None:
    """Create the folders of a cache_path: the cache's root as the user set it (a link there is the user's choice),
    gptjax's own converted/ and model folders below it, never through a link planted in their place."""
    converted, model = cache.parent.parent, cache.parent
    converted.parent.mkdir(parents=True, exist_ok=True)
    for path in (converted, model):
        files.refuse_link(path)
        path.mkdir(exist_ok=True)


def load_hparams_and_params(model_dir: str | Path, dtype=None, quantize: str | None = None) -> tuple[dict, dict]:
    """hparams and params (jax arrays of dtype, float32 by default) of the model in folder model_dir: OpenAI's or
    Hugging Face's layout, converted on the first load and then read from gptjax's cache (cache_path), or gptjax's
    own (params.safetensors), read as it is. quantize="int8": its matrices as int8 (quant.py), quantized on the
    first load and then read from gptjax's cache too (a folder of an int8 model is read as it is)."""
    folder = Path(model_dir)
    read_source, hparams, sources = model_sources(folder)
    if quantize is not None and not stored_quantized(folder):
        read_source, cache = read_quantized, cache_path(folder, f"params-{quantize}.safetensors")
    else:
        cache = folder / CACHE_NAME if read_source is None else cache_path(folder)
    stamp = sources_stamp(sources) if read_source is not None else None  # gptjax's own folder: read as it is
    if read_source is not None and not cache_is_current(cache, stamp):
        flat = read_source(folder, hparams)
        try:
            make_cache_folder(cache)
            files.remove_stale_temporaries(cache.parent)  # what a load killed while writing its cache left behind
            write_safetensors(cache, flat, params_metadata(hparams, flat, sources=stamp))
        except OSError as e:  # a read-only cache, a full disk, a link: the model still loads, converted anew each time
            reason = f"{e.filename}: {e.strerror}" if e.filename and e.strerror else e.strerror or e
            warnings.warn(f"the conversion cache cannot be written ({reason}): the weights will be converted on "
                          f"every load; set GPTJAX_CACHE to a writable folder", stacklevel=2)
            return hparams, unflatten({name: to_device(x, dtype) for name, x in flat.items()})
        del flat  # read the cache back rather than convert these: one copy of the weights in memory, not two
    try:
        return hparams, read_params(cache, hparams, dtype)
    except Damaged:
        if read_source is None:  # the folder's only copy (train.py's output)
            raise
        cache.unlink()  # the cache is ours to remake
        return load_hparams_and_params(model_dir, dtype, quantize)


def read_quantized(folder, hparams):  # any model folder -> its flat params with int8 matrices (numpy)
    return flatten(quant.quantize_params(load_hparams_and_params(folder)[1]))


def save_params(model_dir: str | Path, hparams: dict, params: dict) -> None:
    """Write params (any float dtype, stored as float32; or quant.py's int8) to model_dir/params.safetensors,
    atomically: a folder that load_hparams_and_params and main.py --model_dir read like any other."""
    folder = Path(model_dir)
    folder.mkdir(parents=True, exist_ok=True)
    flat = flatten(params)
    write_safetensors(folder / CACHE_NAME, flat, params_metadata(hparams, flat))


def model_folder(model: str, models_dir: str | Path, download: bool = True) -> Path:
    """A release size (fetched when it lacks a file that loading needs, unless download is false) or a path -> the
    model's folder."""
    model = str(model)
    if os.path.isdir(model) or os.sep in model or "/" in model:
        return Path(model)
    if model not in MODEL_SIZES:
        raise ValueError(f"unknown model {model!r}: give a GPT-2 size ({', '.join(MODEL_SIZES)}) or a model folder")
    folder = Path(models_dir) / model
    missing = [name for name in LOADING_FILES if not (folder / name).exists()]
    if missing and not download:
        raise FileNotFoundError(f"{folder} lacks {', '.join(missing)} of release {model}")
    if missing:  # the whole release, as OpenAI publishes it; checkpoint and model.ckpt.meta alone are not needed
        download_release(model, folder)
    return folder


def tokenizer_folder(folder):
    """folder if it holds tokenizer files, else the folder of GPT-2's own vocabulary that gptjax ships."""
    if any((folder / name).exists() for name in TOKENIZER_FILES):
        return folder
    return encoder.GPT2_VOCAB


def load_model(model: str, models_dir: str | Path = "models", dtype=None, download: bool = True,
               quantize: str | None = None):
    """(folder, hparams, params) of model: a GPT-2 release size, downloaded into models_dir/<size> when incomplete
    (unless download is false), or a model folder (see the module docstring). params are jax arrays of dtype (float32
    by default); quantize="int8": with int8 matrices (load_hparams_and_params)."""
    folder = model_folder(model, models_dir, download)
    try:
        hparams, params = load_hparams_and_params(folder, dtype, quantize)
    except Damaged as e:
        if str(model) in MODEL_SIZES:  # a downloaded release can be fetched again; a user's own files cannot
            raise Damaged(e.path, e.problem, "delete it and run again to download it anew") from None
        raise
    return folder, hparams, params


def load_encoder_hparams_and_params(model: str, models_dir: str | Path = "models", dtype=None,
                                    quantize: str | None = None):
    """(encoder, hparams, params) of model: see load_model."""
    folder, hparams, params = load_model(model, models_dir, dtype, quantize=quantize)
    return encoder.get_encoder(tokenizer_folder(folder)), hparams, params


# ------------------------------------------------------------------------------------------ export to Hugging Face
# Hugging Face's GPT2LMHeadModel stores GPT-2's tensors under "transformer." + hf_name (its Conv1D matrices are
# [in, out], as gpt.py's), ties lm_head to wte (not stored), and names the vocabulary files vocab.json + merges.txt:
# the same contents as encoder.json + vocab.bpe.

HF_FILES = ("config.json", "model.safetensors", "vocab.json", "merges.txt", "tokenizer_config.json", "meta.json")


def hf_config(hparams, eot_token):  # -> config.json for transformers' GPT2LMHeadModel: GPT-2's architecture
    return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": hparams["n_vocab"],
            "n_positions": hparams["n_ctx"], "n_embd": hparams["n_embd"], "n_layer": hparams["n_layer"],
            "n_head": hparams["n_head"], "n_inner": None, "activation_function": "gelu_new",
            "layer_norm_epsilon": 1e-5, "resid_pdrop": 0.1, "embd_pdrop": 0.1, "attn_pdrop": 0.1,
            "initializer_range": 0.02, "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
            "reorder_and_upcast_attn": False, "tie_word_embeddings": True, "bos_token_id": eot_token,
            "eos_token_id": eot_token, "torch_dtype": "float32"}


def hf_tensors(hparams, params):  # params (biases optional) -> {HF name: np.float32 array}
    # train.py's bias=False models have no biases; HF's layers always add one, so theirs are zeros (the same function)
    flat, tensors = flatten(params), {}
    for name, shape in param_shapes(hparams).items():
        array = flat[name] if name in flat else np.zeros(shape, np.float32)
        if name.startswith("h/"):
            for layer in range(hparams["n_layer"]):
                tensors["transformer." + hf_name(name, layer)] = array[layer]
        else:
            tensors["transformer." + hf_name(name, None)] = array
    return tensors


def checked_destination(dest: str | Path) -> Path:
    """The folder to write a model into (to_hf, quantize_model), refused in one line if it holds a model's file of
    any layout; a model-sized temporary left there by a writer that was killed is removed."""
    if not str(dest).strip():
        raise cli.UsageError("the destination is empty: give the folder to write the model into")
    dest = Path(dest)
    taken = [name for name in dict.fromkeys((*HF_FILES, *TOKENIZER_FILES, CACHE_NAME, *RELEASE_FILES))
             if (dest / name).exists() or (dest / name).is_symlink()]
    if taken:
        raise cli.UsageError(f"{dest} already holds {taken[0]}: give a new folder as the destination (a model's files "
                             f"are never written over someone's)")
    files.remove_stale_temporaries(dest)
    return dest


def to_hf(model: str, dest: str | Path, models_dir: str | Path = "models") -> str | None:
    """Write model (a release size or any model folder that load_model reads) to the folder dest in Hugging Face's
    GPT-2 layout: config.json, model.safetensors and, for GPT-2-token models, vocab.json, merges.txt and
    tokenizer_config.json, so that transformers' GPT2LMHeadModel and GPT2TokenizerFast load it.
    -> a note for the user when the vocabulary cannot go with it (a character-level model's has no HF tokenizer)."""
    dest = checked_destination(dest)
    folder, hparams, params = load_model(model, models_dir)
    if quant.is_quantized(params["wte"]):
        raise cli.UsageError(f"{model} is an int8 model: export the float model it was quantized from (Hugging Face's "
                             f"GPT-2 has no int8 layout, and dequantized weights would pass for the original)")
    vocab = tokenizer_folder(folder)
    pair = next((pair for pair in encoder.BPE_FILE_PAIRS if all((vocab / name).is_file() for name in pair)), None)
    eot_token = read_json(vocab / pair[0]).get(encoder.EOT) if pair else None
    dest.mkdir(parents=True, exist_ok=True)
    write_safetensors(dest / "model.safetensors", hf_tensors(hparams, params), {"format": "pt"})
    with files.atomic_write(dest / "config.json", "w") as f:
        json.dump(hf_config(hparams, eot_token), f, indent=2)
    if pair is None:  # keep the character vocabulary for gptjax (main.py --model_dir dest); transformers has no reader
        with files.atomic_write(dest / "meta.json", "wb") as f:
            f.write((vocab / "meta.json").read_bytes())
        return (f"{dest}: the model's character vocabulary (meta.json) has no Hugging Face tokenizer; "
                f"transformers loads the weights, gptjax the whole model")
    for hf_file, name in zip(("vocab.json", "merges.txt"), pair):  # HF's names for encoder.json and vocab.bpe
        with files.atomic_write(dest / hf_file, "wb") as f:
            f.write((vocab / name).read_bytes())
    eot = encoder.EOT
    special = {"bos_token": eot, "eos_token": eot, "unk_token": eot} if eot_token is not None else {}
    with files.atomic_write(dest / "tokenizer_config.json", "w") as f:
        json.dump({"tokenizer_class": "GPT2Tokenizer", "model_max_length": hparams["n_ctx"],
                   "add_prefix_space": False, **special}, f, indent=2)
    return None


def quantize_model(model: str, dest: str | Path, models_dir: str | Path = "models") -> None:
    """Write model (a release size or any model folder) to the new folder dest with int8 matrices (quant.py), in
    gptjax's layout (params.safetensors) with the model's vocabulary files: ~1/4 of the float32 bytes."""
    dest = checked_destination(dest)
    folder, hparams, params = load_model(model, models_dir)
    if quant.is_quantized(params["wte"]):
        raise cli.UsageError(f"{model} is an int8 model already")
    vocab = tokenizer_folder(folder)
    dest.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES if vocab == folder else ():  # else GPT-2's own, which gptjax ships
        if (folder / name).is_file():
            with files.atomic_write(dest / name, "wb") as f:
                f.write((folder / name).read_bytes())
    save_params(dest, hparams, quant.quantize_params(params))


def main(argv=None):
    ap = argparse.ArgumentParser(description="Convert GPT-2 weights between layouts.\n\n"
                                 "    python weights.py to_hf out hf-model   # train.py's out_dir -> Hugging Face's "
                                 "layout\n    python weights.py to_hf 124M gpt2-124m-hf\n"
                                 "    python weights.py quantize 124M gpt2-124m-int8   # int8 matrices: main.py "
                                 "--model_dir gpt2-124m-int8",
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = ap.add_subparsers(dest="command", required=True)
    for name, what in (("to_hf", "write a model in Hugging Face's GPT-2 layout (transformers loads it)"),
                       ("quantize", "write a model with int8 weights (a scale per 32 values), ~1/4 of the bytes")):
        command = commands.add_parser(name, help=what)
        command.add_argument("src", help="a GPT-2 release size (124M ... 1558M) or a model folder: OpenAI's, HF's or "
                                         "a train.py out_dir")
        command.add_argument("dest", help="the folder to write (new, or without a model in it)")
        command.add_argument("--models_dir", default="models", help="where releases are downloaded")
    return cli.run(lambda argv: export(ap.parse_args(argv)), argv)


def export(args):  # python weights.py to_hf|quantize SRC DEST
    if args.src not in MODEL_SIZES and not Path(args.src).is_dir():
        raise cli.UsageError(f"{args.src} is neither a GPT-2 size ({', '.join(MODEL_SIZES)}) nor a model folder")
    if args.command == "quantize":
        quantize_model(args.src, args.dest, args.models_dir)
        print(f"wrote {args.dest} with int8 weights: python main.py --model_dir {args.dest} --prompt TEXT")
        return
    note = to_hf(args.src, args.dest, args.models_dir)
    if note:
        print(note, file=sys.stderr)
    print(f"wrote {args.dest} in Hugging Face's GPT-2 layout")


if __name__ == "__main__":
    sys.exit(main())
