"""Tests of weights.py: downloads from a local HTTP server (cuts, retries, Range, 404/500, no server), the TensorFlow
checkpoint reader against the checkpoint TensorFlow wrote (testdata/gpt2-tiny), the Hugging Face reader, the cache,
and the error messages. References: the safetensors package reading the HF fixture, a float64 numpy GPT-2 forward
pass checked against expected.json, and published CRC-32C check values. All offline."""
import http.server
import json
import math
import pathlib
import re
import shutil
import socket
import sys
import threading

import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import urllib3

import weights

HERE = pathlib.Path(__file__).parent
WEIGHTS_TINY_TF = HERE / "testdata" / "gpt2-tiny"
WEIGHTS_TINY_HF = HERE / "testdata" / "gpt2-tiny-hf"
WEIGHTS_EXPECTED = json.loads((WEIGHTS_TINY_TF / "expected.json").read_text())
WEIGHTS_DATA = "model.ckpt.data-00000-of-00001"


# ------------------------------------------------------------------------------------------------ references

def weights_reference_params():  # the fixture's weights as read by the safetensors package, stacked by hand
    hf = safetensors.numpy.load_file(WEIGHTS_TINY_HF / "model.safetensors")
    n_layer = WEIGHTS_EXPECTED["hparams"]["n_layer"]

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


def weights_flat(params, prefix=""):  # nested params -> {"h/ln_1/g": np.ndarray}
    flat = {}
    for key, value in params.items():
        if isinstance(value, dict):
            flat.update(weights_flat(value, f"{prefix}{key}/"))
        else:
            flat[prefix + key] = np.asarray(value)
    return flat


def weights_assert_params_equal(params, expected):
    flat = weights_flat(params)
    assert sorted(flat) == sorted(expected)
    for name in expected:
        assert flat[name].dtype == np.float32, name
        np.testing.assert_array_equal(flat[name], expected[name], err_msg=name)


def weights_numpy_gpt2(flat, ids, n_head):  # float64 GPT-2 forward pass: [n_seq] -> [n_seq, n_vocab]
    p = {k: np.asarray(v, np.float64) for k, v in flat.items()}

    def layer_norm(x, g, b):
        mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
        return (x - mean) / np.sqrt(var + 1e-5) * g + b

    def gelu(x):
        return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))

    n_seq = len(ids)
    x = p["wte"][ids] + p["wpe"][:n_seq]
    causal = np.tril(np.ones((n_seq, n_seq), bool))
    for i in range(p["h/ln_1/g"].shape[0]):
        h = layer_norm(x, p["h/ln_1/g"][i], p["h/ln_1/b"][i])
        q, k, v = np.split(h @ p["h/attn/c_attn/w"][i] + p["h/attn/c_attn/b"][i], 3, axis=-1)
        q, k, v = (t.reshape(n_seq, n_head, -1).transpose(1, 0, 2) for t in (q, k, v))
        scores = np.where(causal, q @ k.transpose(0, 2, 1) / math.sqrt(q.shape[-1]), -np.inf)
        att = np.exp(scores - scores.max(-1, keepdims=True))
        att /= att.sum(-1, keepdims=True)
        heads = (att @ v).transpose(1, 0, 2).reshape(n_seq, -1)
        x = x + heads @ p["h/attn/c_proj/w"][i] + p["h/attn/c_proj/b"][i]
        h = layer_norm(x, p["h/ln_2/g"][i], p["h/ln_2/b"][i])
        x = x + gelu(h @ p["h/mlp/c_fc/w"][i] + p["h/mlp/c_fc/b"][i]) @ p["h/mlp/c_proj/w"][i] + p["h/mlp/c_proj/b"][i]
    return layer_norm(x, p["ln_f/g"], p["ln_f/b"]) @ p["wte"].T


def weights_crc32c_bitwise(data):  # CRC-32C one bit at a time, straight from the definition
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


# ---------------------------------------------------------------------------------- TF tensor bundle writer
# Writes checkpoints in TensorFlow's format to make variants of the fixture (other dtypes, new weights); the reader is
# checked against the bundle TensorFlow itself wrote (testdata/gpt2-tiny).

def weights_varint(n):
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def weights_pb(field, value):  # one protobuf field: int -> varint, bytes -> length-delimited
    if isinstance(value, int):
        return weights_varint(field << 3) + weights_varint(value)
    return weights_varint(field << 3 | 2) + weights_varint(len(value)) + value


def weights_table_block(entries):
    out, restarts = bytearray(), []
    for key, value in entries:
        restarts.append(len(out))
        out += weights_varint(0) + weights_varint(len(key)) + weights_varint(len(value)) + key + value
    for r in restarts:
        out += r.to_bytes(4, "little")
    return bytes(out + len(restarts).to_bytes(4, "little"))


def weights_sstable(entries):
    out = bytearray()

    def put(block):
        handle = weights_varint(len(out)) + weights_varint(len(block))
        out.extend(block + b"\0" + weights.masked_crc32c(block + b"\0").to_bytes(4, "little"))
        return handle
    data = put(weights_table_block(entries))
    meta = put(weights_table_block([]))
    index = put(weights_table_block([(entries[-1][0], data)]))
    return bytes(out + (meta + index).ljust(40, b"\0") + weights.TABLE_MAGIC.to_bytes(8, "little"))


def weights_write_bundle(prefix, tensors):  # {name: float32/float16/bfloat16 array} -> prefix.index, prefix.data-*
    codes = {np.dtype(np.float32): 1, np.dtype(np.float16): 19, np.dtype(jnp.bfloat16): 14}
    data, entries = bytearray(), []
    for name in sorted(tensors):
        raw = np.ascontiguousarray(tensors[name]).tobytes()
        shape = b"".join(weights_pb(2, weights_pb(1, d)) for d in tensors[name].shape)
        entry = (weights_pb(1, codes[tensors[name].dtype]) + weights_pb(2, shape) + weights_pb(4, len(data))
                 + weights_pb(5, len(raw)) + bytes([6 << 3 | 5]) + weights.masked_crc32c(raw).to_bytes(4, "little"))
        entries.append((name.encode(), entry))
        data += raw
    header = weights_pb(1, 1) + weights_pb(3, weights_pb(1, 1))
    pathlib.Path(f"{prefix}.index").write_bytes(weights_sstable([(b"", header)] + entries))
    pathlib.Path(f"{prefix}.data-00000-of-00001").write_bytes(bytes(data))


def weights_tf_tensors(flat):  # flat stacked params -> {TF checkpoint name: array}, with the [1, in, out] matrices
    tensors = {}
    for name, array in flat.items():
        if name.startswith("h/"):
            for i, layer in enumerate(array):
                tensors[f"model/h{i}/{name[2:]}"] = layer[None] if name.endswith("/w") else layer
        else:
            tensors[f"model/{name}"] = array
    return tensors


# ------------------------------------------------------------------------------------------------ HTTP server

class WeightsHandler(http.server.BaseHTTPRequestHandler):
    """Serves the fixture as release 124M. server.plan maps a URL path to actions used once each, in order: an HTTP
    status to answer with, "cut" (send half the body, then hang up) or "ignore_range" (answer 200 with everything)."""

    def do_GET(self):
        self.server.log.append((self.path, self.headers.get("Range")))
        plan = self.server.plan.get(self.path, [])
        action = plan.pop(0) if plan else None
        source = self.server.files.get(self.path)
        if isinstance(action, int) or source is None:
            self.send_error(action or 404)
            return
        data = source.read_bytes()
        ranged = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", "")) if action != "ignore_range" else None
        start = int(ranged.group(1)) if ranged else 0
        self.send_response(206 if ranged else 200)
        if ranged:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        body = data[start:]
        self.wfile.write(body[:len(body) // 2] if action == "cut" else body)

    def log_message(self, *args):
        pass


@pytest.fixture
def weights_server(monkeypatch):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), WeightsHandler)
    server.files = {f"/models/124M/{name}": WEIGHTS_TINY_TF / name for name in weights.RELEASE_FILES}
    server.plan, server.log = {}, []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("GPTJAX_BASE_URL", f"http://127.0.0.1:{server.server_address[1]}")
    monkeypatch.setattr(weights, "BACKOFF_S", 0.001)
    yield server
    server.shutdown()
    server.server_close()


def weights_requests(server, name):
    return [rng for path, rng in server.log if path == f"/models/124M/{name}"]


def weights_copy(tmp_path, source):  # a writable copy of a fixture folder (loading writes the cache beside it)
    ignore = shutil.ignore_patterns(weights.CACHE_NAME, "*.part")  # left there by loads of the fixture in place
    return pathlib.Path(shutil.copytree(source, tmp_path / source.name, ignore=ignore))


def weights_error(exc_info):  # the message of a raised error, which must be one line
    message = str(exc_info.value)
    assert "\n" not in message
    return message


# ------------------------------------------------------------------------------------------------------ tests

def test_weights_crc32c_check_values():
    assert weights.crc32c(b"123456789") == 0xE3069283
    assert weights.crc32c(bytes(32)) == 0x8A9136AA  # RFC 3720 (iSCSI) B.4
    assert weights.crc32c(b"\xff" * 32) == 0x62A8AB43
    assert weights.crc32c(bytes(range(32))) == 0x46DD794E
    assert weights.crc32c(b"") == 0


def test_weights_crc32c_matches_bitwise_definition(monkeypatch):
    monkeypatch.setattr(weights, "CRC_BLOCK", 64)  # exercise the merging of blocks, not only of leaves
    rng = np.random.default_rng(0)
    for n in (1, 2, 15, 16, 17, 63, 64, 65, 100, 1000):
        data = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
        assert weights.crc32c(data) == weights_crc32c_bitwise(data), n
        assert weights.crc32c(data[n // 3:], weights.crc32c(data[:n // 3])) == weights_crc32c_bitwise(data), n


def test_weights_download_load_and_logits(tmp_path, weights_server):
    hparams, params = weights.load_hparams_and_params(weights.model_folder("124M", tmp_path / "models"))
    for name in weights.RELEASE_FILES:
        assert (tmp_path / "models" / "124M" / name).read_bytes() == (WEIGHTS_TINY_TF / name).read_bytes(), name
    assert not list((tmp_path / "models" / "124M").glob("*.part"))
    assert hparams == WEIGHTS_EXPECTED["hparams"]
    expected = weights_reference_params()
    weights_assert_params_equal(params, expected)
    for prompt in WEIGHTS_EXPECTED["prompts"]:
        logits = weights_numpy_gpt2(weights_flat(params), prompt["ids"], hparams["n_head"])
        np.testing.assert_allclose(logits[-1], prompt["last_logits"], atol=1e-4)


def test_weights_cut_transfer_resumes_with_range(tmp_path, weights_server):
    weights_server.plan[f"/models/124M/{WEIGHTS_DATA}"] = ["cut"]
    folder = weights.model_folder("124M", tmp_path)
    ranges = weights_requests(weights_server, WEIGHTS_DATA)
    assert ranges[0] is None and re.fullmatch(r"bytes=[1-9]\d*-", ranges[1]) and len(ranges) == 2
    assert (folder / WEIGHTS_DATA).read_bytes() == (WEIGHTS_TINY_TF / WEIGHTS_DATA).read_bytes()


def test_weights_cut_transfer_caught_by_size_check(tmp_path, weights_server, monkeypatch):
    # urllib3 1.x (allowed by requests) ends a cut body quietly instead of raising: the Content-Length check catches it
    init = urllib3.response.HTTPResponse.__init__
    monkeypatch.setattr(urllib3.response.HTTPResponse, "__init__",
                        lambda self, *a, **kw: init(self, *a, **{**kw, "enforce_content_length": False}))
    weights_server.plan[f"/models/124M/{WEIGHTS_DATA}"] = ["cut"]
    folder = weights.model_folder("124M", tmp_path)
    assert len(weights_requests(weights_server, WEIGHTS_DATA)) == 2
    assert (folder / WEIGHTS_DATA).read_bytes() == (WEIGHTS_TINY_TF / WEIGHTS_DATA).read_bytes()


def test_weights_cut_transfer_restarts_when_server_ignores_range(tmp_path, weights_server):
    weights_server.plan[f"/models/124M/{WEIGHTS_DATA}"] = ["cut", "ignore_range"]
    folder = weights.model_folder("124M", tmp_path)
    assert weights_requests(weights_server, WEIGHTS_DATA)[1] is not None  # asked for the rest, got the whole file
    assert (folder / WEIGHTS_DATA).read_bytes() == (WEIGHTS_TINY_TF / WEIGHTS_DATA).read_bytes()


def test_weights_500_once_is_retried(tmp_path, weights_server):
    weights_server.plan["/models/124M/hparams.json"] = [500, 503]
    folder = weights.model_folder("124M", tmp_path)
    assert len(weights_requests(weights_server, "hparams.json")) == 3
    assert (folder / "hparams.json").read_bytes() == (WEIGHTS_TINY_TF / "hparams.json").read_bytes()


def test_weights_persistent_500_fails_without_partial_file(tmp_path, weights_server):
    weights_server.plan[f"/models/124M/{WEIGHTS_DATA}"] = [500] * (weights.RETRIES + 1)
    with pytest.raises(ConnectionError) as e:
        weights.load_encoder_hparams_and_params("124M", tmp_path)
    message = weights_error(e)
    assert f"/models/124M/{WEIGHTS_DATA}" in message and "HTTP 500" in message and str(tmp_path / "124M") in message
    assert len(weights_requests(weights_server, WEIGHTS_DATA)) == weights.RETRIES + 1
    assert not (tmp_path / "124M" / WEIGHTS_DATA).exists()


def test_weights_404_names_url_and_sizes(tmp_path, weights_server):
    weights_server.plan["/models/124M/hparams.json"] = [404]
    with pytest.raises(FileNotFoundError) as e:
        weights.load_encoder_hparams_and_params("124M", tmp_path)
    message = weights_error(e)
    assert f"{weights.base_url()}/models/124M/hparams.json" in message and "404" in message and "1558M" in message
    assert len(weights_requests(weights_server, "hparams.json")) == 1  # a 404 is final: no retries


def test_weights_no_server_names_url_and_folder(tmp_path, monkeypatch):
    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("GPTJAX_BASE_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setattr(weights, "BACKOFF_S", 0.001)
    with pytest.raises(ConnectionError) as e:
        weights.load_encoder_hparams_and_params("124M", tmp_path / "models")
    message = weights_error(e)
    assert f"http://127.0.0.1:{port}/models/124M/checkpoint" in message
    assert str(tmp_path / "models" / "124M") in message and "by hand" in message


def test_weights_complete_folder_is_not_fetched_again(tmp_path, weights_server):
    weights.model_folder("124M", tmp_path)
    weights_server.log.clear()
    weights.load_hparams_and_params(weights.model_folder("124M", tmp_path))
    assert weights_server.log == []
    (tmp_path / "124M" / "vocab.bpe").unlink()
    weights.model_folder("124M", tmp_path)
    assert [path for path, _ in weights_server.log] == ["/models/124M/vocab.bpe"]


def test_weights_leftover_part_file_is_resumed(tmp_path, weights_server):
    folder = tmp_path / "124M"
    folder.mkdir()
    whole = (WEIGHTS_TINY_TF / WEIGHTS_DATA).read_bytes()
    (folder / f"{WEIGHTS_DATA}.part").write_bytes(whole[:1000])  # an earlier run stopped here
    weights.model_folder("124M", tmp_path)
    assert weights_requests(weights_server, WEIGHTS_DATA) == ["bytes=1000-"]
    assert (folder / WEIGHTS_DATA).read_bytes() == whole


def test_weights_hf_folder_equals_tf_folder(tmp_path):
    _, tf_params = weights.load_hparams_and_params(weights_copy(tmp_path, WEIGHTS_TINY_TF))
    hparams, hf_params = weights.load_hparams_and_params(weights_copy(tmp_path, WEIGHTS_TINY_HF))
    assert hparams == WEIGHTS_EXPECTED["hparams"]
    weights_assert_params_equal(hf_params, weights_flat(tf_params))
    weights_assert_params_equal(tf_params, weights_reference_params())


def test_weights_hf_without_transformer_prefix_and_in_bfloat16(tmp_path):
    folder = tmp_path / "hf"
    folder.mkdir()
    shutil.copy(WEIGHTS_TINY_HF / "config.json", folder)
    hf = safetensors.numpy.load_file(WEIGHTS_TINY_HF / "model.safetensors")
    bf16 = {name.removeprefix("transformer."): x.astype(jnp.bfloat16) for name, x in hf.items()}
    header = {name: {"dtype": "BF16", "shape": list(x.shape), "data_offsets": [0, 0]} for name, x in bf16.items()}
    offset = 0
    for name, x in bf16.items():
        header[name]["data_offsets"] = [offset, offset + x.nbytes]
        offset += x.nbytes
    blob = json.dumps(header).encode()
    (folder / "model.safetensors").write_bytes(len(blob).to_bytes(8, "little") + blob
                                               + b"".join(x.tobytes() for x in bf16.values()))
    _, params = weights.load_hparams_and_params(folder)
    expected = {name: x.astype(jnp.bfloat16).astype(np.float32) for name, x in weights_reference_params().items()}
    weights_assert_params_equal(params, expected)


def test_weights_cache_is_written_used_and_invalidated(tmp_path, monkeypatch):
    folder = weights_copy(tmp_path, WEIGHTS_TINY_TF)
    expected = weights_reference_params()
    weights.load_hparams_and_params(folder)
    cached = safetensors.numpy.load_file(folder / "params.safetensors")  # readable by the reference implementation
    assert sorted(cached) == sorted(expected)
    for name in expected:
        np.testing.assert_array_equal(cached[name], expected[name])
    with safetensors.safe_open(folder / "params.safetensors", "np") as f:
        assert json.loads(f.metadata()["hparams"]) == WEIGHTS_EXPECTED["hparams"]

    with monkeypatch.context() as m:  # a second load reads the cache only
        m.setattr(weights, "read_tf_params", lambda *a: pytest.fail("the checkpoint was read again"))
        _, params = weights.load_hparams_and_params(folder)
    weights_assert_params_equal(params, expected)

    doubled = {name: x * 2 for name, x in expected.items()}  # a new checkpoint in place of the old one
    weights_write_bundle(folder / "model.ckpt", weights_tf_tensors(doubled))
    _, params = weights.load_hparams_and_params(folder)
    weights_assert_params_equal(params, doubled)


def test_weights_damaged_cache_is_remade(tmp_path):
    folder = weights_copy(tmp_path, WEIGHTS_TINY_TF)
    weights.load_hparams_and_params(folder)
    cache = folder / "params.safetensors"
    cache.write_bytes(cache.read_bytes()[:-100])
    _, params = weights.load_hparams_and_params(folder)
    weights_assert_params_equal(params, weights_reference_params())
    assert cache.stat().st_size > 100 + sum(x.nbytes for x in weights_reference_params().values())


def test_weights_dtype_bfloat16(tmp_path):
    _, params = weights.load_hparams_and_params(weights_copy(tmp_path, WEIGHTS_TINY_TF), dtype=jnp.bfloat16)
    flat = weights_flat(params)
    for name, x in weights_reference_params().items():
        assert flat[name].dtype == jnp.bfloat16
        np.testing.assert_array_equal(flat[name], x.astype(jnp.bfloat16), err_msg=name)


def test_weights_half_and_bfloat16_checkpoints(tmp_path):
    expected = weights_reference_params()
    for dtype in (np.float16, jnp.bfloat16):
        folder = tmp_path / np.dtype(dtype).name
        folder.mkdir()
        shutil.copy(WEIGHTS_TINY_TF / "hparams.json", folder)
        tensors = weights_tf_tensors({name: x.astype(dtype) for name, x in expected.items()})
        weights_write_bundle(folder / "model.ckpt", tensors)
        _, params = weights.load_hparams_and_params(folder)
        weights_assert_params_equal(params, {n: x.astype(dtype).astype(np.float32) for n, x in expected.items()})


def test_weights_corrupt_data_file_fails_its_checksum(tmp_path):
    folder = weights_copy(tmp_path, WEIGHTS_TINY_TF)
    data = bytearray((folder / WEIGHTS_DATA).read_bytes())
    data[len(data) // 2] ^= 0x01
    (folder / WEIGHTS_DATA).write_bytes(bytes(data))
    with pytest.raises(ValueError) as e:
        weights.load_hparams_and_params(folder)
    message = weights_error(e)
    assert str(folder / WEIGHTS_DATA) in message and "crc32c" in message and "delete it" in message


def test_weights_truncated_data_file(tmp_path):
    folder = weights_copy(tmp_path, WEIGHTS_TINY_TF)
    (folder / WEIGHTS_DATA).write_bytes((WEIGHTS_TINY_TF / WEIGHTS_DATA).read_bytes()[:-10])
    with pytest.raises(ValueError) as e:
        weights.load_hparams_and_params(folder)
    message = weights_error(e)
    assert str(folder / WEIGHTS_DATA) in message and "truncated" in message and "delete it" in message


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_weights_damaged_index_file(tmp_path, damage):
    folder = weights_copy(tmp_path, WEIGHTS_TINY_TF)
    index = (folder / "model.ckpt.index").read_bytes()
    if damage == "truncate":
        index = index[:len(index) // 2]
    else:
        index = index[:100] + bytes([index[100] ^ 0x40]) + index[101:]
    (folder / "model.ckpt.index").write_bytes(index)
    with pytest.raises(ValueError) as e:
        weights.load_hparams_and_params(folder)
    message = weights_error(e)
    assert str(folder / "model.ckpt.index") in message and "delete it" in message
    assert ("footer" if damage == "truncate" else "checksum") in message


def test_weights_unknown_model_size(tmp_path):
    with pytest.raises(ValueError) as e:
        weights.load_encoder_hparams_and_params("125M", tmp_path)
    message = weights_error(e)
    assert "'125M'" in message and all(size in message for size in weights.MODEL_SIZES)


def test_weights_missing_files_are_named(tmp_path):
    folder = tmp_path / "partial"
    folder.mkdir()
    with pytest.raises(FileNotFoundError) as e:
        weights.load_hparams_and_params(folder)
    assert str(folder) in weights_error(e) and "hparams.json" in weights_error(e)
    shutil.copy(WEIGHTS_TINY_TF / "model.ckpt.index", folder)
    with pytest.raises(FileNotFoundError) as e:
        weights.load_hparams_and_params(folder)
    assert re.search(rf"{re.escape(str(folder))} lacks hparams.json, {WEIGHTS_DATA}$", weights_error(e))
    with pytest.raises(FileNotFoundError) as e:
        weights.load_hparams_and_params(tmp_path / "absent")
    assert str(tmp_path / "absent") in weights_error(e)


def test_weights_hf_folder_with_only_pytorch_bin(tmp_path):
    folder = tmp_path / "hf"
    folder.mkdir()
    shutil.copy(WEIGHTS_TINY_HF / "config.json", folder)
    (folder / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError) as e:
        weights.load_hparams_and_params(folder)
    assert "model.safetensors" in weights_error(e) and str(folder) in weights_error(e)


@pytest.mark.parametrize("change", [{"activation_function": "relu"}, {"layer_norm_epsilon": 1e-6},
                                    {"model_type": "gpt_neo"}])
def test_weights_hf_config_outside_gpt2_is_refused(tmp_path, change):
    folder = weights_copy(tmp_path, WEIGHTS_TINY_HF)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(ValueError) as e:
        weights.load_hparams_and_params(folder)
    assert str(folder / "config.json") in weights_error(e) and next(iter(change)) in weights_error(e)


def test_weights_hf_folder_gets_gpt2_tokenizer_files(tmp_path, weights_server):
    folder = weights_copy(tmp_path, WEIGHTS_TINY_HF)
    assert weights.tokenizer_folder(folder, tmp_path / "models") == tmp_path / "models" / "124M"
    assert sorted(path for path, _ in weights_server.log) == ["/models/124M/encoder.json", "/models/124M/vocab.bpe"]
    for name in ("encoder.json", "vocab.bpe"):
        assert (tmp_path / "models" / "124M" / name).read_bytes() == (WEIGHTS_TINY_TF / name).read_bytes()
    weights_server.log.clear()
    assert weights.tokenizer_folder(folder, tmp_path / "models") == tmp_path / "models" / "124M"
    assert weights.tokenizer_folder(WEIGHTS_TINY_TF, tmp_path / "models") == WEIGHTS_TINY_TF
    assert weights_server.log == []


def test_weights_load_encoder_hparams_and_params_finds_the_vocabulary(tmp_path, weights_server, monkeypatch):
    stub = type(sys)("encoder")  # records which folder the tokenizer would be read from
    stub.get_encoder = lambda folder: pathlib.Path(folder)
    monkeypatch.setitem(sys.modules, "encoder", stub)
    models = tmp_path / "models"
    folder, hparams, params = weights.load_encoder_hparams_and_params("124M", models, dtype=jnp.bfloat16)
    assert folder == models / "124M" and hparams == WEIGHTS_EXPECTED["hparams"]
    assert weights_flat(params)["wte"].dtype == jnp.bfloat16
    weights_server.log.clear()
    hf = weights_copy(tmp_path, WEIGHTS_TINY_HF)  # no tokenizer files: GPT-2's, already in models/124M
    folder, _, params = weights.load_encoder_hparams_and_params(str(hf), models)
    assert folder == models / "124M" and weights_server.log == []
    weights_assert_params_equal(params, weights_reference_params())


def test_weights_unwritable_cache_still_loads(tmp_path):
    folder = weights_copy(tmp_path, WEIGHTS_TINY_TF)
    (folder / "params.safetensors").mkdir()  # the cache cannot be put in place
    with pytest.warns(UserWarning, match="converted on every load"):
        _, params = weights.load_hparams_and_params(folder)
    weights_assert_params_equal(params, weights_reference_params())
    assert not list(folder.glob(".*part"))


def test_weights_end_to_end_hf_folder_with_gpt2_tokenizer(tmp_path, weights_server):
    hf = weights_copy(tmp_path, WEIGHTS_TINY_HF)
    encoder, hparams, params = weights.load_encoder_hparams_and_params(str(hf), tmp_path / "models")
    for prompt in WEIGHTS_EXPECTED["prompts"]:
        ids = list(encoder.encode(prompt["text"]))
        assert ids == prompt["ids"]
        logits = weights_numpy_gpt2(weights_flat(params), ids, hparams["n_head"])
        np.testing.assert_allclose(logits[-1], prompt["last_logits"], atol=1e-4)
