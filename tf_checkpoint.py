"""OpenAI's TensorFlow checkpoint read with numpy alone: the tensor bundle's SSTable index, its protobuf entries and
the crc32c-checked tensors of its data file. No TensorFlow.

    entries, n_shards = read_bundle_index(folder / "model.ckpt.index")  # {name: {dtype, shape, shard, offset, ...}}
    with open(folder / "model.ckpt.data-00000-of-00001", "rb") as f:
        wte = bundle_tensor(f, path, "model/wte", entries["model/wte"])   # float32 array, checksum verified

A checkpoint is a tensor bundle: `prefix.index`, a LevelDB-style sorted table mapping each tensor's name to a
BundleEntryProto (dtype, shape, shard, offset, size, crc32c), and `prefix.data-0000i-of-0000n`, the raw tensors.
weights.py maps the tensors onto gpt.py's params.
"""
import re
from pathlib import Path

import google_crc32c
import ml_dtypes
import numpy as np

from files import Damaged

# ----------------------------------------------------------------------------------------------------- crc32c
# TensorFlow checksums every tensor and every index block with crc32c (Castagnoli), which the standard library lacks.
# google-crc32c is Google's C implementation (the CPU's crc32 instruction): ~12 GB/s here, where the vectorised numpy
# code it replaced ran at ~0.3 GB/s (124M's first load: 1.5 s of checksumming; 1558M's: ~20 s).

def crc32c(data, crc=0):
    """CRC-32C (Castagnoli) of bytes or a contiguous array; crc32c(b, crc32c(a)) == crc32c(a + b)."""
    if isinstance(data, np.ndarray) and data.flags.writeable:  # the library takes read-only buffers only
        data = data.view()
        data.flags.writeable = False
    return google_crc32c.extend(crc, data)


def masked_crc32c(data):  # TensorFlow stores CRCs masked, so that a CRC of data holding CRCs stays well mixed
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


# ------------------------------------------------------------------------------------------------ the tensor bundle

TABLE_MAGIC = 0xDB4775248B80FB57
TF_DTYPES = {1: np.dtype("<f4"), 2: np.dtype("<f8"), 14: np.dtype(ml_dtypes.bfloat16), 19: np.dtype("<f2")}
TF_DTYPE_NAMES = {3: "int32", 7: "string", 9: "int64", 10: "bool"}  # for the error message only


def read_varint(buf, pos):  # -> (value, position after it); IndexError past the end
    value = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def parse_proto(buf):  # protobuf message -> {field number: [values]}: varints as ints, length-delimited as bytes
    fields, pos = {}, 0
    while pos < len(buf):
        key, pos = read_varint(buf, pos)
        wire = key & 7
        if wire == 0:
            value, pos = read_varint(buf, pos)
        elif wire in (1, 5):  # fixed64, fixed32
            width = 8 if wire == 1 else 4
            value, pos = int.from_bytes(buf[pos:pos + width], "little"), pos + width
        elif wire == 2:
            length, pos = read_varint(buf, pos)
            value, pos = bytes(buf[pos:pos + length]), pos + length
        else:
            raise ValueError(f"protobuf wire type {wire}")
        if pos > len(buf):
            raise ValueError("truncated protobuf message")
        fields.setdefault(key >> 3, []).append(value)
    return fields


def table_block(table, handle):  # the block a BlockHandle (offset, size varints) points to, checked
    offset, pos = read_varint(handle, 0)
    size, _ = read_varint(handle, pos)
    block, trailer = table[offset:offset + size], table[offset + size:offset + size + 5]
    if len(trailer) < 5:
        raise ValueError("a block runs past the end of the file")
    if trailer[0] != 0:
        raise ValueError(f"compressed blocks (type {trailer[0]}) are not supported")
    if masked_crc32c(block + trailer[:1]) != int.from_bytes(trailer[1:], "little"):
        raise ValueError("block checksum mismatch")
    return block


def block_entries(block):  # -> [(key, value)]; each key shares a prefix with the one before it
    n_restarts = int.from_bytes(block[-4:], "little")
    end = len(block) - 4 - 4 * n_restarts  # the restart offsets (for binary search) are not needed for a full scan
    entries, key, pos = [], b"", 0
    while pos < end:
        shared, pos = read_varint(block, pos)
        unshared, pos = read_varint(block, pos)
        length, pos = read_varint(block, pos)
        key = key[:shared] + block[pos:pos + unshared]
        entries.append((key, block[pos + unshared:pos + unshared + length]))
        pos += unshared + length
    if pos != end:
        raise ValueError("malformed table block")
    return entries


def read_table(table):  # SSTable bytes -> {key: value}
    if len(table) < 48 or int.from_bytes(table[-8:], "little") != TABLE_MAGIC:
        raise ValueError("no table footer at its end")
    footer = table[-48:-8]  # metaindex handle, index handle (offset and size varints each), padding
    _, pos = read_varint(footer, 0)  # the metaindex handle is skipped: TensorFlow writes no meta blocks
    _, pos = read_varint(footer, pos)
    index = table_block(table, footer[pos:])
    entries = {}
    for _, handle in block_entries(index):  # the index block points at the data blocks
        entries.update(block_entries(table_block(table, handle)))
    return entries


def read_bundle_index(path):  # model.ckpt.index -> ({tensor name: entry}, number of data shards)
    try:
        table = read_table(Path(path).read_bytes())
        header = parse_proto(table.pop(b""))
        entries = {name.decode(): bundle_entry(value) for name, value in table.items()}
    except (ValueError, IndexError, KeyError) as e:
        raise Damaged(path, str(e) if isinstance(e, ValueError) else "truncated or malformed") from None
    if header.get(2, [0])[0] != 0:
        raise ValueError(f"{path}: big-endian checkpoints are not supported")
    return entries, header.get(1, [1])[0]


def bundle_entry(buf):  # BundleEntryProto -> dict
    fields = parse_proto(buf)
    dims = parse_proto(fields[2][0]).get(2, []) if 2 in fields else []
    return {"dtype": fields[1][0], "shape": tuple(parse_proto(d).get(1, [0])[0] for d in dims),
            "shard": fields.get(3, [0])[0], "offset": fields.get(4, [0])[0], "size": fields.get(5, [0])[0],
            "crc32c": fields.get(6, [None])[0], "sliced": 7 in fields}


def bundle_tensor(f, path, name, entry):  # one tensor of an open data file -> float32 array, checksum verified
    if entry["sliced"] or entry["dtype"] not in TF_DTYPES:
        kind = "partitioned" if entry["sliced"] else TF_DTYPE_NAMES.get(entry["dtype"], f"of dtype {entry['dtype']}")
        raise ValueError(f"{path}: tensor {name} is {kind}; GPT-2 checkpoints hold unpartitioned float tensors")
    dtype = TF_DTYPES[entry["dtype"]]
    if entry["size"] != dtype.itemsize * int(np.prod(entry["shape"])):
        raise Damaged(path.with_name(path.name.split(".data-")[0] + ".index"), f"tensor {name} has a wrong size")
    buf = np.empty(entry["size"], np.uint8)
    f.seek(entry["offset"])
    if f.readinto(buf) != entry["size"]:
        raise Damaged(path, f"truncated: tensor {name} ends at byte {entry['offset'] + entry['size']}")
    if entry["crc32c"] is not None and masked_crc32c(buf) != entry["crc32c"]:
        raise Damaged(path, f"crc32c checksum mismatch in tensor {name}")
    return buf.view(dtype).reshape(entry["shape"]).astype(np.float32, copy=False)


def checkpoint_prefix(folder):  # "model.ckpt" in the release; the `checkpoint` file names it for other TF checkpoints
    found = re.search(r'^model_checkpoint_path: "([^"]+)"', read_text(folder / "checkpoint"), re.M)
    return Path(found.group(1)).name if found else "model.ckpt"


def read_text(path):
    return path.read_text() if path.exists() else ""
