"""The independent references tests.py checks gptjax against, and its shared helpers: a float64 numpy GPT-2, the
fixture's weights read by the safetensors package, CRC-32C from its definition, a writer of TensorFlow tensor bundles
(checked against the bundle TensorFlow wrote, testdata/gpt2-tiny), and a release server on 127.0.0.1 that injects
faults. None of it calls the code under test to make an expected value.

    from testlib import numpy_gpt2, reference_params, ReleaseHandler, write_bundle, ...
"""
import atexit
import contextlib
import http.server
import json
import math
import os
import pathlib
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import ml_dtypes
import numpy as np
import safetensors.numpy

import tf_checkpoint

HERE = pathlib.Path(__file__).parent
TESTDATA = HERE / "testdata"
PROGRAMS = TESTDATA / "programs"  # small Python programs the tests run in a process of their own
TINY_TF, TINY_HF = TESTDATA / "gpt2-tiny", TESTDATA / "gpt2-tiny-hf"  # the fixtures (testdata/README.md)
EXPECTED = json.loads((TINY_TF / "expected.json").read_text())
PROMPTS = EXPECTED["prompts"]
SHAKESPEARE = HERE / "corpora" / "tinyshakespeare.txt"  # shipped with gptjax (corpora/README.md)
DATA_FILE = "model.ckpt.data-00000-of-00001"

# Everything the tests write goes below SCRATCH, removed at exit: the model folders they load (a load writes its
# converted cache beside the weights), the compilation cache (this process's and its children's), the runs' outputs.
SCRATCH = pathlib.Path(tempfile.mkdtemp(prefix="gptjax-tests-"))
atexit.register(shutil.rmtree, SCRATCH, ignore_errors=True)
os.environ["GPTJAX_COMPILATION_CACHE"] = str(SCRATCH / "jax-cache")
os.environ["GPTJAX_CACHE"] = str(SCRATCH / "cache")  # converted weights (weights.cache_path)
# XLA's optimisation passes off, in this process (tests.py sets it before anything compiles) and its children: the
# tests' models are tiny, so compiling, not running, is most of the suite's time, and unoptimised compiles take half
# as long. What the tests check (values against references, bitwise resumes, memory plans relative to each other)
# holds either way; bench.py measures speed with the optimisations on, as users run.
os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "1"


def scratch_copy(folder):  # a copy of a testdata folder under SCRATCH, made once; tests load copies, not testdata/
    copy = SCRATCH / "testdata" / folder.name
    if not copy.exists():
        shutil.copytree(folder, copy, ignore=shutil.ignore_patterns("*.part"))
    return copy


def run_program(name, *args, env=None, **kwargs):  # testdata/programs/NAME in a fresh process, the checkout importable
    env = {**os.environ, "PYTHONPATH": str(HERE), **(env or {})}
    return subprocess.run([sys.executable, str(PROGRAMS / name), *map(str, args)], capture_output=True, text=True,
                          cwd=HERE, env=env, **kwargs)


# ------------------------------------------------------------------------------------------- the float64 model

def reference_params():  # the fixture's weights as read by the safetensors package, stacked by hand
    hf = safetensors.numpy.load_file(TINY_HF / "model.safetensors")
    n_layer = EXPECTED["hparams"]["n_layer"]

    def stack(name):
        return np.stack([hf[f"transformer.h.{i}.{name}"] for i in range(n_layer)])
    params = {"wte": hf["transformer.wte.weight"], "wpe": hf["transformer.wpe.weight"],
              "ln_f/g": hf["transformer.ln_f.weight"], "ln_f/b": hf["transformer.ln_f.bias"]}
    for block in ("ln_1", "ln_2", "attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
        name = block.replace(".", "/")
        leaves = ("g", "b") if block.startswith("ln") else ("w", "b")
        params[f"h/{name}/{leaves[0]}"] = stack(f"{block}.weight")
        params[f"h/{name}/{leaves[1]}"] = stack(f"{block}.bias")
    return params


def flat_params(params, prefix=""):  # nested params -> {"h/ln_1/g": np.ndarray}
    flat = {}
    for key, value in params.items():
        if isinstance(value, dict):
            flat.update(flat_params(value, f"{prefix}{key}/"))
        else:
            flat[prefix + key] = np.asarray(value)
    return flat


def assert_params_equal(params, expected):
    flat = flat_params(params)
    assert sorted(flat) == sorted(expected)
    for name in expected:
        assert flat[name].dtype == np.float32, name
        np.testing.assert_array_equal(flat[name], expected[name], err_msg=name)


def numpy_gpt2(flat, ids, n_head, drop=None):  # float64 GPT-2 forward pass: [..., n_seq] -> [..., n_seq, n_vocab]
    """drop(site, layer, x) -> x after dropout at each of GPT-2's dropout sites: "embd" (the embedding sum, layer
    None), "attn_weights" (after the softmax), "attn" and "mlp" (each residual branch); None: no dropout."""
    p = {k: np.asarray(v, np.float64) for k, v in flat.items()}
    drop = drop or (lambda site, layer, x: x)

    def layer_norm(x, g, b):
        mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
        return (x - mean) / np.sqrt(var + 1e-5) * g + b

    def gelu(x):
        return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))

    ids = np.asarray(ids)
    n_seq = ids.shape[-1]
    x = drop("embd", None, p["wte"][ids] + p["wpe"][:n_seq])
    causal = np.tril(np.ones((n_seq, n_seq), bool))
    for i in range(p["h/ln_1/g"].shape[0]):
        h = layer_norm(x, p["h/ln_1/g"][i], p["h/ln_1/b"][i])
        q, k, v = np.split(h @ p["h/attn/c_attn/w"][i] + p["h/attn/c_attn/b"][i], 3, axis=-1)
        q, k, v = (t.reshape(*t.shape[:-1], n_head, -1).swapaxes(-3, -2) for t in (q, k, v))  # [.., head, seq, d]
        scores = np.where(causal, q @ k.swapaxes(-1, -2) / math.sqrt(q.shape[-1]), -np.inf)
        att = np.exp(scores - scores.max(-1, keepdims=True))
        att = drop("attn_weights", i, att / att.sum(-1, keepdims=True))
        heads = (att @ v).swapaxes(-3, -2).reshape(x.shape)
        x = x + drop("attn", i, heads @ p["h/attn/c_proj/w"][i] + p["h/attn/c_proj/b"][i])
        h = layer_norm(x, p["h/ln_2/g"][i], p["h/ln_2/b"][i])
        x = x + drop("mlp", i, gelu(h @ p["h/mlp/c_fc/w"][i] + p["h/mlp/c_fc/b"][i]) @ p["h/mlp/c_proj/w"][i]
                     + p["h/mlp/c_proj/b"][i])
    return layer_norm(x, p["ln_f/g"], p["ln_f/b"]) @ p["wte"].T


def crc32c_bitwise(data):  # CRC-32C one bit at a time, straight from the definition
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


# ------------------------------------------------------------------------------------- TF tensor bundle writer
# Writes checkpoints in TensorFlow's format to make variants of the fixture (other dtypes, new weights); the reader is
# checked against the bundle TensorFlow itself wrote (testdata/gpt2-tiny). CRCs come from tf_checkpoint.masked_crc32c,
# which a test checks against crc32c_bitwise.

def varint(n):
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def pb(field, value):  # one protobuf field: int -> varint, bytes -> length-delimited
    if isinstance(value, int):
        return varint(field << 3) + varint(value)
    return varint(field << 3 | 2) + varint(len(value)) + value


def table_block(entries):
    out, restarts = bytearray(), []
    for key, value in entries:
        restarts.append(len(out))
        out += varint(0) + varint(len(key)) + varint(len(value)) + key + value
    for r in restarts:
        out += r.to_bytes(4, "little")
    return bytes(out + len(restarts).to_bytes(4, "little"))


def sstable(entries):
    out = bytearray()

    def put(block):
        handle = varint(len(out)) + varint(len(block))
        out.extend(block + b"\0" + tf_checkpoint.masked_crc32c(block + b"\0").to_bytes(4, "little"))
        return handle
    data = put(table_block(entries))
    meta = put(table_block([]))
    index = put(table_block([(entries[-1][0], data)]))
    return bytes(out + (meta + index).ljust(40, b"\0") + tf_checkpoint.TABLE_MAGIC.to_bytes(8, "little"))


def write_bundle(prefix, tensors):  # {name: float32/float16/bfloat16 array} -> prefix.index, prefix.data-*
    codes = {np.dtype(np.float32): 1, np.dtype(np.float16): 19, np.dtype(ml_dtypes.bfloat16): 14}
    data, entries = bytearray(), []
    for name in sorted(tensors):
        raw = np.ascontiguousarray(tensors[name]).tobytes()
        shape = b"".join(pb(2, pb(1, d)) for d in tensors[name].shape)
        entry = (pb(1, codes[tensors[name].dtype]) + pb(2, shape) + pb(4, len(data))
                 + pb(5, len(raw)) + bytes([6 << 3 | 5]) + tf_checkpoint.masked_crc32c(raw).to_bytes(4, "little"))
        entries.append((name.encode(), entry))
        data += raw
    header = pb(1, 1) + pb(3, pb(1, 1))
    pathlib.Path(f"{prefix}.index").write_bytes(sstable([(b"", header)] + entries))
    pathlib.Path(f"{prefix}.data-00000-of-00001").write_bytes(bytes(data))


def tf_tensors(flat):  # flat stacked params -> {TF checkpoint name: array}, with the [1, in, out] matrices
    tensors = {}
    for name, array in flat.items():
        if name.startswith("h/"):
            for i, layer in enumerate(array):
                tensors[f"model/h{i}/{name[2:]}"] = layer[None] if name.endswith("/w") else layer
        else:
            tensors[f"model/{name}"] = array
    return tensors


# --------------------------------------------------------------------------------- a release server with faults

PORTAL_PAGE = b"<!DOCTYPE html><html><body>Sign in to the guest network to continue</body></html>"


class ReleaseHandler(http.server.BaseHTTPRequestHandler):
    """Serves the fixture as release 124M. server.plan maps a URL path to actions used once each, in order: an HTTP
    status to answer with, "cut" (send half the body, then hang up), "ignore_range" (answer 200 with everything),
    "portal" / "portal_as_file" (answer 200 with a captive portal's web page, as text/html / as a binary file),
    "trickle" (send a byte every 50 ms), "slow" (send the file in 8 pieces over 0.4 s), "endless" (stream 8 MB of
    zeros with no Content-Length), "wrong_range" (answer a Range request with 206 and the file from byte 0)."""

    def do_GET(self):
        self.server.log.append((self.path, self.headers.get("Range")))
        plan = self.server.plan.get(self.path, [])
        action = plan.pop(0) if plan else None
        source = self.server.files.get(self.path)
        if isinstance(action, int) or source is None:
            self.send_error(action or 404)
            return
        if action in ("portal", "portal_as_file"):
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8" if action == "portal" else
                             "application/octet-stream")
            self.send_header("Content-Length", str(len(PORTAL_PAGE)))
            self.end_headers()
            self.wfile.write(PORTAL_PAGE)
            return
        if action == "endless":  # bounded all the same: the client must stop long before
            self.send_response(200)
            self.end_headers()
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                for _ in range(128):
                    self.wfile.write(bytes(1 << 16))
            return
        data = source.read_bytes()
        ranged = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", "")) if action != "ignore_range" else None
        start = int(ranged.group(1)) if ranged and action != "wrong_range" else 0
        self.send_response(206 if ranged else 200)
        if ranged:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        body = data[start:]
        try:
            if action == "trickle":
                for i in range(min(len(body), 200)):  # bounded: the client gives up long before
                    self.wfile.write(body[i:i + 1])
                    self.wfile.flush()
                    time.sleep(0.05)
            elif action == "slow":
                for i in range(8):
                    self.wfile.write(body[i * len(body) // 8:(i + 1) * len(body) // 8])
                    self.wfile.flush()
                    time.sleep(0.05)
            else:
                self.wfile.write(body[:len(body) // 2] if action == "cut" else body)
        except (BrokenPipeError, ConnectionResetError):  # the client hung up
            pass

    def log_message(self, *args):
        pass


def requests_for(server, name):
    return [rng for path, rng in server.log if path == f"/models/124M/{name}"]


# ------------------------------------------------------------------------------------------------------ helpers

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def folder_state(folder):  # {name: bytes} of every file in folder: to show that nothing was written
    return {p.name: p.read_bytes() for p in sorted(pathlib.Path(folder).iterdir()) if p.is_file()}


def read_safetensors(path):  # {name: array}, read by the safetensors package: a reader that is not gptjax's
    return safetensors.numpy.load_file(str(path))


def ckpt_tensors(out_dir):
    return safetensors.numpy.load_file(pathlib.Path(out_dir) / "ckpt.safetensors")
