"""Datasets for train.py: text turned once into token ids, stored as train.bin / val.bin (uint16, memory-mapped), plus
the vocabulary that maps them back to text.

    python data.py shakespeare_char                       # data/shakespeare_char/: character tokens
    python data.py shakespeare                            # data/shakespeare/: GPT-2 BPE tokens
    python data.py path/to/text.txt --tokens=char         # data/text_char/ (or --tokens=gpt2: data/text_gpt2/)
    python data.py path/to/folder --tokens=gpt2           # every text file under it, one document each
    python data.py openwebtext --source=path/to/openwebtext --num_proc=16

A prepared dataset is a folder {data_dir}/{name}/ holding
  - train.bin, val.bin: the token ids, uint16, one after the other;
  - meta.json: the vocabulary. Character tokens: {"kind": "char", "chars": [the characters, in id order]}, which is
    what encoder.get_encoder reads. GPT-2 tokens: {"kind": "gpt2"}, with GPT-2's encoder.json and vocab.bpe copied
    beside it. Either way `encoder.get_encoder(folder)` decodes the ids, and train.py copies the vocabulary into its
    out_dir so that main.py can sample from the model it trains.
meta.json is written last: a folder without it is unfinished and is prepared again.

Splits. One text (a file, tiny Shakespeare) is cut at 90% of its characters, train before val, as nanoGPT does. A
folder of documents sends a fixed, seeded choice of documents (val_fraction of them, at least one) to val. GPT-2
tokens end every document with <|endoftext|>, as GPT-2 was trained.

Tiny Shakespeare is read from {data_dir}/shakespeare_char/input.txt (or shakespeare/input.txt) when one is there,
else from corpora/tinyshakespeare.txt, which ships with gptjax: no download. OpenWebText is not downloaded (about 40
GB of text and 12 GB of tokens): point --source at a folder of its .txt documents, or at the folder of .xz archives
that the original release (Skylion007's openwebtext.tar.xz) unpacks to; these are read with the standard library.
GPT-2's vocabulary files are the ones shipped in vocab/ (or --vocab_dir's).

Scale. Every text is read in pieces (text_pieces), so memory stays bounded whatever a file's or a document's size; a
folder's files are encoded by --num_proc worker processes, each into a part file of its own, so that a preparation
that stops (Ctrl-C, a kill, a worker the system killed: reported, never waited on for ever) goes on from the parts
already made when run again. --skip_bad leaves out the documents that are not UTF-8.

Batches (get_batch) gather block_size + 1 tokens at a few random offsets from the memmap, so a dataset larger than
memory trains just as well; only the pages touched are read.
"""
import argparse
import bz2
import codecs
import concurrent.futures
import gzip
import json
import lzma
import multiprocessing
import os
import re
import shutil
import sys
import tarfile
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import numpy as np
from tqdm import tqdm

import cli
import encoder
import files

SHAKESPEARE = Path(__file__).resolve().parent / "corpora" / "tinyshakespeare.txt"  # shipped: no download needed
NAMED = {"shakespeare_char": "char", "shakespeare": "gpt2", "openwebtext": "gpt2"}  # name -> its tokens
TOKENS = ("char", "gpt2")
TRAIN_FRACTION = 0.9       # of one text's characters, as nanoGPT
VAL_FRACTION = 0.1         # of a folder's documents
OWT_VAL_FRACTION = 0.0005  # OpenWebText: nanoGPT's split, about 4,000 documents
SPLIT_SEED = 2357          # which documents of a folder go to val (nanoGPT's OpenWebText seed)
SPLITS = ("train", "val")


# ---------------------------------------------------------------------------------------------------- reading

def is_prepared(folder):  # gptjax's own layout, or a folder of llm.c token shards
    return all((Path(folder) / name).is_file() for name in ("train.bin", "val.bin", "meta.json")) or \
        is_shard_folder(folder)


def dataset_folder(dataset: str, data_dir: str | Path, tokens: str | None = None) -> Path:
    """Where `dataset` is (or will be) prepared: a name under data_dir, or for a path to text, a folder named after
    it and its tokens: data/notes.txt with char tokens -> data_dir/notes_char."""
    if dataset in NAMED or not (os.sep in dataset or "/" in dataset or Path(dataset).exists()):
        return Path(data_dir) / dataset
    return Path(data_dir) / f"{Path(dataset).resolve().stem}_{tokens}"


def load_split(folder: Path, split: str, n_vocab: int | None = None):
    """-> the split's tokens: a [n_tokens] uint16 memmap, or the ShardedTokens of an llm.c shard folder; every id
    checked to be < n_vocab (when given)."""
    path = Path(folder) / f"{split}.bin"
    if not path.is_file() and is_shard_folder(folder):
        paths = shards_of(folder)[split]
        tokens = ShardedTokens([read_shard(p) for p in paths])
        if n_vocab is not None:
            for shard, shard_path in zip(tokens.shards, paths):
                check_token_ids(shard, n_vocab, shard_path)
        return tokens
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: prepare the dataset with `python data.py {Path(folder).name}`")
    size = path.stat().st_size
    if size < 2 or size % 2:
        problem = "is empty" if size < 2 else f"has an odd number of bytes ({size:,}), so it is not uint16 tokens"
        raise ValueError(f"{path} {problem}: prepare the dataset again")
    tokens = np.memmap(path, dtype=np.uint16, mode="r")
    if n_vocab is not None:
        check_token_ids(tokens, n_vocab, path)
    return tokens


def check_token_ids(tokens, n_vocab, path):  # tokens: one memmap
    """Every id must be one of the model's n_vocab: an id past the end would train silently on whatever lies beyond
    (a gather is clamped, not checked). Read in slices: memory stays bounded, ~2 GB/s here."""
    for start in range(0, len(tokens), 1 << 26):
        top = int(tokens[start:start + (1 << 26)].max())
        if top >= n_vocab:
            raise ValueError(f"{path} holds token id {top}, but the model's vocabulary has {n_vocab} tokens: the "
                             f"dataset was prepared for another vocabulary; prepare it again for this model")


def check_vocabulary(dataset, n_vocab, model_vocab, vocab):
    """A pretrained or resumed model (of n_vocab tokens) must train on ids of its own vocabulary: model_vocab and vocab
    (the dataset's) as meta.json holds them."""
    if vocab["kind"] != model_vocab["kind"]:
        hint = " (tiny Shakespeare in GPT-2 tokens: --dataset=shakespeare)" if model_vocab["kind"] == "gpt2" else ""
        raise ValueError(f"the model reads {model_vocab['kind']} tokens but dataset {dataset} has "
                         f"{vocab['kind']} tokens: prepare it with --tokens={model_vocab['kind']}{hint}")
    if vocab["kind"] == "char" and (vocab["chars"] != model_vocab.get("chars", vocab["chars"])
                                    or len(vocab["chars"]) != n_vocab):
        raise ValueError(f"dataset {dataset} has another character vocabulary ({len(vocab['chars'])} "
                         f"characters) than the model ({n_vocab}): train it on text of the same characters, "
                         f"as the dataset it was trained on")


def model_vocabulary(vocab_dir):  # a model folder's vocabulary as check_vocabulary compares it: meta.json, or GPT-2
    return read_meta(vocab_dir) if (Path(vocab_dir) / "meta.json").is_file() else {"kind": "gpt2"}


def prepared_folder(dataset, data_dir, tokens):
    """The folder where dataset was prepared with tokens, which must be complete; nothing is prepared (a resumed
    run reads what its run trained on)."""
    folder = dataset_folder(dataset, data_dir, tokens)
    if is_shard_folder(dataset):  # llm.c's shards: read where they are
        return Path(dataset)
    if not is_prepared(folder) and is_prepared(Path(data_dir) / dataset):  # a folder given by name
        folder = Path(data_dir) / dataset
    if not is_prepared(folder):
        raise FileNotFoundError(f"the dataset {dataset} is not prepared in {folder}: give the --dataset and --data_dir "
                                f"the run trained on")
    return folder


def read_meta(folder):
    path = Path(folder) / "meta.json"
    if not path.is_file() and is_shard_folder(folder):  # llm.c's shards hold GPT-2 tokens
        return {"kind": "gpt2"}
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} does not exist: prepare the dataset with `python data.py`") from None
    except ValueError as e:
        raise ValueError(f"{path} is not valid JSON ({e}): prepare the dataset again") from None
    chars = meta.get("chars") if isinstance(meta, dict) else None
    if not isinstance(meta, dict) or meta.get("kind") not in TOKENS or (
            meta["kind"] == "char" and not (isinstance(chars, list) and chars and all(
                isinstance(c, str) and len(c) == 1 for c in chars))):
        raise ValueError(f'{path} should hold {{"kind": "char", "chars": [...]}} or {{"kind": "gpt2"}}: prepare the '
                         f'dataset again')
    return meta


def batch_starts(n_tokens: int, block_size: int, batch_size: int, seed: int, it: int,
                 split: str) -> np.ndarray:  # [batch_size] int64 offsets
    """Random offsets of batch `it` of split, a pure function of its arguments: resuming at iteration it draws the
    same batches as a run that never stopped, with no sampler state to save."""
    if n_tokens <= block_size:
        raise ValueError(f"the {split} split has {n_tokens} tokens, too few for block_size {block_size}: use a smaller "
                         f"--block_size or more text")
    rng = np.random.default_rng([seed, SPLITS.index(split), it])
    return rng.integers(0, n_tokens - block_size, size=batch_size)


def get_batch(data, starts: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    # [n_tokens] tokens, [B] starts -> x [B, block_size] int32, y: x shifted by one
    if isinstance(data, ShardedTokens):
        window = data.windows(starts, block_size + 1)
    else:
        window = data[starts[:, None] + np.arange(block_size + 1)].astype(np.int32)  # reads only these tokens
    return window[:, :-1], window[:, 1:]


# ------------------------------------------------------------------------------------------- llm.c token shards
# llm.c's and modded-nanogpt's format (dev/data/data_common.py): a header of 256 little-endian int32 (magic 20240520,
# version 1, the token count, zeros), then the tokens as uint16. A folder of NAME_train_NNNNNN.bin and
# NAME_val_NNNNNN.bin shards (FineWeb's, say) is a dataset as it is: memory-mapped in place, never copied or converted.

SHARD_MAGIC, SHARD_VERSION, SHARD_HEADER_BYTES = 20240520, 1, 256 * 4
SHARD_TOKENS = 100_000_000  # per shard written by write_shards, as llm.c's FineWeb shards
SHARD_NAME = re.compile(r"^(?P<name>.+)_(?P<split>train|val)_(?P<index>\d+)\.bin$")
SHARDS_WRITTEN = ".gptjax-shards"  # in a --to_shards folder: the names of the shards data.py wrote there


def shard_files(folder) -> list[tuple[str, str, int, Path]]:  # (NAME, split, number, path) of each shard in folder
    if not Path(folder).is_dir():
        return []
    return [(m["name"], m["split"], int(m["index"]), path) for path in sorted(Path(folder).iterdir())
            if (m := SHARD_NAME.match(path.name))]


def is_shard_folder(folder):
    return bool(shard_files(folder))


def shards_of(folder) -> dict[str, list[Path]]:
    """{split: its shard paths in order} of an llm.c shard folder, which must hold one dataset whole: one NAME (no
    shards of another dataset beside it), both splits, and each split's numbers without a gap (llm.c's fineweb.py
    numbers val 0 and train from 1; data.py --to_shards numbers each split from 0)."""
    found = shard_files(folder)
    names = sorted({name for name, *_ in found})
    if len(names) > 1:
        raise ValueError(f"{folder} holds the shards of {len(names)} datasets ({', '.join(names)}): a shard folder "
                         f"is one dataset; move the others to folders of their own")
    out = {}
    for split in SPLITS:
        numbered = sorted((index, path) for _, s, index, path in found if s == split)
        if not numbered:
            raise ValueError(f"{folder} holds {names[0]}'s llm.c token shards but no {split} shard "
                             f"({names[0]}_{split}_NNNNNN.bin): add it, or give a whole shard folder")
        numbers = [index for index, _ in numbered]
        for expected, index in zip(range(numbers[0], numbers[0] + len(numbers)), numbers):
            if index != expected:
                raise ValueError(f"{folder} lacks {names[0]}_{split}_{expected:06d}.bin between its shards "
                                 f"{numbers[0]:06d} and {numbers[-1]:06d}: a shard folder must be whole")
        out[split] = [path for _, path in numbered]
    return out


def read_shard(path: Path) -> np.memmap:  # -> [n_tokens] uint16 memmap of one shard's tokens, its header checked
    if (size := Path(path).stat().st_size) <= SHARD_HEADER_BYTES:
        raise ValueError(f"{path} is empty ({size:,} bytes: no tokens after llm.c's {SHARD_HEADER_BYTES:,}-byte "
                         f"header): write it again, or remove it")
    header = np.fromfile(path, "<i4", 256)
    if len(header) < 256 or header[0] != SHARD_MAGIC:
        raise ValueError(f"{path} is not an llm.c token shard (magic {header[0] if len(header) else None}, not "
                         f"{SHARD_MAGIC})")
    if header[1] != SHARD_VERSION:
        raise ValueError(f"{path} is a version {header[1]} shard; version {SHARD_VERSION} (uint16 GPT-2 tokens) is "
                         f"read")
    n_tokens, size = int(header[2]), Path(path).stat().st_size
    if n_tokens < 1 or size != SHARD_HEADER_BYTES + 2 * n_tokens:
        raise ValueError(f"{path} holds {size:,} bytes where its header's {n_tokens:,} tokens take "
                         f"{SHARD_HEADER_BYTES + 2 * max(n_tokens, 0):,}: it is cut or damaged")
    return np.memmap(path, np.uint16, "r", offset=SHARD_HEADER_BYTES, shape=(n_tokens,))


class ShardedTokens:
    """A split's shards as one sequence of tokens, one shard after the other, read in place: len(), and windows at
    offsets into the whole (a window may run from one shard into the next)."""

    def __init__(self, shards):
        self.shards = shards
        self.ends = np.cumsum([len(shard) for shard in shards])

    def __len__(self):
        return int(self.ends[-1])

    def windows(self, starts, length):  # [B] offsets -> [B, length] int32
        out = np.empty((len(starts), length), np.int32)
        for row, start in enumerate(starts):
            pos, filled = int(start), 0
            while filled < length:
                i = int(np.searchsorted(self.ends, pos, side="right"))
                offset = pos - (int(self.ends[i - 1]) if i else 0)
                take = min(length - filled, len(self.shards[i]) - offset)
                out[row, filled:filled + take] = self.shards[i][offset:offset + take]
                filled, pos = filled + take, pos + take
        return out


def write_shards(folder, dest, name, shard_tokens=None):
    """A prepared dataset of GPT-2 tokens -> dest/NAME_{val,train}_NNNNNN.bin in llm.c's format, each shard written
    atomically, so that llm.c and modded-nanogpt train on gptjax's data (and gptjax on theirs). dest holds this
    dataset only: the shards an earlier --to_shards wrote there (listed in dest/.gptjax-shards) are replaced, and a
    folder holding shards that data.py did not write is refused."""
    if read_meta(folder)["kind"] != "gpt2":
        raise ValueError(f"{folder} holds character tokens; llm.c's shards hold GPT-2 tokens: prepare it with "
                         f"--tokens=gpt2")
    shard_tokens = shard_tokens or SHARD_TOKENS
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    written = dest / SHARDS_WRITTEN
    ours = set(json.loads(written.read_text())) if written.is_file() else set()
    theirs = [path.name for *_, path in shard_files(dest) if path.name not in ours]
    if theirs:
        raise FileExistsError(f"{dest} holds shards that data.py did not write ({theirs[0]}): give an empty folder "
                              f"to --to_shards")
    splits = {split: load_split(folder, split) for split in SPLITS}
    names = [f"{name}_{split}_{i:06d}.bin" for split, tokens in splits.items()
             for i in range(-(-len(tokens) // shard_tokens))]
    write_atomic(written, json.dumps(sorted(ours | set(names))).encode())  # before any shard: a crash leaves them ours
    for old in ours - set(names):
        (dest / old).unlink(missing_ok=True)
    for split, tokens in splits.items():
        for i, start in enumerate(range(0, len(tokens), shard_tokens)):
            part = np.asarray(tokens[start:start + shard_tokens])
            header = np.zeros(256, "<i4")
            header[:3] = SHARD_MAGIC, SHARD_VERSION, len(part)
            with files.atomic_write(dest / f"{name}_{split}_{i:06d}.bin") as f:
                f.write(header.tobytes())
                f.write(part.astype("<u2").tobytes())
    write_atomic(written, json.dumps(names).encode())


# ----------------------------------------------------------------------------------------------------- writing

def write_atomic(path, data):  # bytes -> path: path is whole or as it was, never half-written
    with files.atomic_write(path) as f:
        f.write(data)


def write_ids(f, ids) -> int:  # one array of ids -> an open token file, as uint16
    ids = np.asarray(ids)
    if ids.size and ids.max() > np.iinfo(np.uint16).max:
        raise ValueError(f"token id {int(ids.max())} does not fit in uint16; vocabularies of at most 65,536 tokens "
                         f"are supported")
    f.write(ids.astype(np.uint16).tobytes())
    return ids.size


def write_meta(folder, meta):
    write_atomic(Path(folder) / "meta.json", json.dumps(meta, ensure_ascii=False).encode("utf-8"))


def char_vocab(chars):  # every character that occurs, sorted: nanoGPT's shakespeare_char vocabulary
    chars = sorted(chars)
    if len(chars) > 1 << 16:
        raise ValueError(f"the text has {len(chars)} distinct characters; at most 65,536 fit in uint16 tokens")
    return chars


def char_encoder(chars):  # -> text -> [n_chars] int64 ids, by a table look-up on the code points
    table = np.full(max(map(ord, chars), default=0) + 1, -1, np.int64)
    table[[ord(c) for c in chars]] = np.arange(len(chars))
    return lambda text: table[np.frombuffer(text.encode("utf-32-le"), np.uint32)]


def gpt2_encoder(vocab_dir):
    """GPT-2's tokenizer from vocab_dir (encoder.json + vocab.bpe)."""
    vocab_dir = Path(vocab_dir)
    missing = [name for name in encoder.GPT2_FILES if not (vocab_dir / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{vocab_dir} lacks {', '.join(missing)}: give a --vocab_dir that holds GPT-2's "
                                f"encoder.json and vocab.bpe, or leave it out to use the ones in {encoder.GPT2_VOCAB}")
    return encoder.get_encoder(vocab_dir)


def copy_gpt2_vocab(vocab_dir, folder):
    for name in encoder.GPT2_FILES:
        write_atomic(Path(folder) / name, (Path(vocab_dir) / name).read_bytes())


# ----------------------------------------------------------------------------------------------- reading text
# Texts are read in pieces of about PIECE_BYTES, so that memory stays bounded whatever a file's size, and cut only
# where GPT-2's pre-tokenizer splits the text anyway (its pattern never joins characters across these points), so
# the pieces' tokens, one after the other, are the whole text's: between a non-space character and " x" (a space
# then a non-space), or after a line break between two non-space characters. Bytes are kept as they are ("\r\n"
# stays, in files and archives alike).

PIECE_BYTES = 8 << 20
MAX_RUN_BYTES = 64 << 20  # a run this long with no place to cut (one 64 MB word) is refused
CUT = re.compile(r"(?<=\S)(?= \S)|(?<=\S\n)(?=\S)")


def text_pieces(stream, name):
    """A binary stream of UTF-8 text -> its text in pieces cut where tokenization is unchanged (see above)."""
    decode = codecs.getincrementaldecoder("utf-8")().decode
    carry, offset = "", 0
    while True:
        try:
            raw = stream.read(PIECE_BYTES)
        except (EOFError, lzma.LZMAError, tarfile.TarError, OSError) as e:  # a damaged or cut compressed stream
            raise ValueError(f"{name} cannot be read ({e}); replace it or remove it") from None
        try:
            text = carry + decode(raw, final=not raw)
        except UnicodeDecodeError as e:
            raise ValueError(f"{name} is not UTF-8 text ({e.reason} at byte {offset + e.start:,})") from None
        offset += len(raw)
        if not raw:
            if text:
                yield text
            return
        cut = last_cut(text)
        if cut <= 0:
            if len(text) > MAX_RUN_BYTES:
                raise ValueError(f"{name} holds more than {MAX_RUN_BYTES:,} characters with no space or line break "
                                 f"between words: too long a run to tokenize in bounded memory")
            carry = text
            continue
        yield text[:cut]
        carry = text[cut:]


def last_cut(text):  # the last place in text where a piece may end (see above), or -1
    for start in (max(0, len(text) - 65536), 0):  # almost always found near the end
        cut = -1
        for found in CUT.finditer(text, start):
            cut = found.start()
        if cut > 0:
            return cut
    return -1


COMPRESSED = {".xz": lzma.open, ".gz": gzip.open, ".bz2": bz2.open}


def documents(path):
    """The documents of one source, each as an iterator of its text pieces: a text file is one document; an archive
    (OpenWebText's .xz files are tar archives of .txt documents) holds one per member file, read in archive order
    in a single pass; a compressed file (.xz, .gz, .bz2) that is not a tar archive is one document."""
    if path.endswith(ARCHIVES) and tarfile.is_tarfile(path):
        try:
            with tarfile.open(path, mode="r|*") as archive:  # a stream: no seeking back, whatever the order
                for member in archive:
                    if member.isfile():
                        yield text_pieces(archive.extractfile(member), f"{path}:{member.name}")
        except (tarfile.TarError, EOFError, lzma.LZMAError, OSError) as e:
            raise ValueError(f"{path} is a damaged archive ({e}); replace it or remove it from the folder") from None
        return
    opener = COMPRESSED.get(Path(path).suffix, open)
    try:
        with opener(path, "rb") as stream:
            yield text_pieces(stream, path)
    except (EOFError, lzma.LZMAError, gzip.BadGzipFile, OSError) as e:
        raise ValueError(f"{path} cannot be read ({e}); replace it or remove it from the folder") from None


# ---------------------------------------------------------------------------------------------- one text

def prepare_text(folder, path, tokens, vocab_dir):
    """One text file -> folder/{train,val}.bin + meta.json: the first 90% of its characters train, the rest
    validate (nanoGPT's split). Two streaming passes: the characters (count and vocabulary), then the tokens."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    files.remove_stale_temporaries(folder)  # what a preparation killed mid-write left behind
    (folder / "meta.json").unlink(missing_ok=True)  # unfinished until it is written again
    n_chars, chars = 0, set()
    for piece in single_text(path):  # the length (for the cut), and for character tokens the vocabulary
        n_chars += len(piece)
        if tokens == "char":
            chars.update(piece)
    if n_chars < 2:
        raise ValueError(f"{path} has {n_chars} characters: too little to train on")
    if tokens == "char":
        vocab = char_vocab(chars)
        encode, meta = char_encoder(vocab), {"kind": "char", "chars": vocab}
    else:
        encode, meta = gpt2_encoder(vocab_dir).encode_ordinary, {"kind": "gpt2"}
        copy_gpt2_vocab(vocab_dir, folder)
    cut = int(n_chars * TRAIN_FRACTION)
    with files.atomic_write(folder / "train.bin") as train, files.atomic_write(folder / "val.bin") as val:
        at = 0  # characters read so far
        for piece in single_text(path):
            if at < cut:  # the piece that holds the cut is encoded as its two sides, as nanoGPT encodes its halves
                write_ids(train, encode(piece[:cut - at]))
            if at + len(piece) > cut:
                write_ids(val, encode(piece[max(cut - at, 0):]))
            at += len(piece)
    write_meta(folder, meta)


def single_text(path):  # the pieces of the one document of path
    for pieces in documents(str(path)):
        yield from pieces


# ---------------------------------------------------------------------------------------------- document folders
# Each source file is encoded by a worker process into a part file of its own (parts/NNNNNNN.bin, written
# atomically), then the parts are joined into train.bin and val.bin. A preparation that is stopped (Ctrl-C, a kill, a
# dead worker) goes on from the parts already written when run again with the same sources.

ARCHIVES = (".tar", ".tar.gz", ".tgz", ".tar.xz", ".xz", ".tar.bz2")
WORKER = {}  # each encoding process's tokenizer
WORKER_BYTES = 256 << 20  # a worker's memory: GPT-2's tokenizer (~80 MB measured) and the documents it encodes


def text_sources(root):
    """The files under root, sorted: text files or archives of them. Hidden files and folders (.git, .ssh, ...) and
    symbolic links are left out: a link could point anywhere, a dataset holds its own files."""
    found = []
    for folder, subfolders, names in os.walk(root):  # os.walk does not follow links to folders
        subfolders[:] = sorted(name for name in subfolders if not name.startswith("."))
        for name in names:
            path = os.path.join(folder, name)
            if not name.startswith(".") and not os.path.islink(path) and os.path.isfile(path):
                found.append(path)
    return sorted(found)


def val_sources(n_sources, fraction):  # a fixed random choice of the sources that validate (at least one)
    n_val = min(max(1, round(n_sources * fraction)), n_sources - 1)
    return set(np.random.default_rng(SPLIT_SEED).permutation(n_sources)[:n_val].tolist())


def init_worker(tokens, vocab, skip_bad):  # vocab: the characters, or the folder of GPT-2's vocabulary files
    if tokens == "gpt2":
        enc = gpt2_encoder(vocab)
        WORKER["encode"], WORKER["end"] = enc.encode_ordinary, [enc.eot_token]  # documents end with EOT
    else:
        WORKER["encode"], WORKER["end"] = char_encoder(vocab), []
    WORKER["skip_bad"] = skip_bad


def encode_source(path, part):
    """Every document of the source path -> tokens in the file part, one document after the other. -> (the number of
    documents, those skipped as not UTF-8)."""
    n_docs, skipped = 0, []
    with files.atomic_write(part) as f:
        for pieces in documents(path):
            start = f.tell()
            try:
                for piece in pieces:
                    write_ids(f, WORKER["encode"](piece))
            except ValueError as e:
                if not (WORKER["skip_bad"] and "is not UTF-8" in str(e)):
                    raise
                f.seek(start)  # this document's tokens so far go
                f.truncate()
                skipped.append(str(e))
                continue
            write_ids(f, WORKER["end"])
            n_docs += 1
    return n_docs, skipped


def folder_chars(sources):  # every character of every document, for a character vocabulary (a streaming pass)
    chars = set()
    for path in sources:
        for pieces in documents(path):
            for piece in pieces:
                chars.update(piece)
    return char_vocab(chars)


def prepare_folder(folder, root, tokens, vocab_dir, val_fraction=VAL_FRACTION, num_proc=1, skip_bad=False):
    """Every document under root -> folder/{train,val}.bin + meta.json, encoded in num_proc processes. The split is
    by source file: val_fraction of them (at least one) validate. skip_bad: leave out documents that are not UTF-8
    (counted and reported) instead of stopping."""
    folder, sources = Path(folder), text_sources(root)
    if len(sources) == 1 and not sources[0].endswith(ARCHIVES):
        return prepare_text(folder, sources[0], tokens, vocab_dir)
    if len(sources) < 2:
        raise ValueError(f"{root} holds {len(sources)} files; a folder needs at least two to split into train and "
                         f"val (or give the text file itself)")
    folder.mkdir(parents=True, exist_ok=True)
    files.remove_stale_temporaries(folder)
    (folder / "meta.json").unlink(missing_ok=True)
    if tokens == "char":  # the vocabulary must be known before encoding: one pass to collect the characters
        vocab = folder_chars(sources)
        meta = {"kind": "char", "chars": vocab}
    else:
        gpt2_encoder(vocab_dir)  # a missing vocabulary is reported once, here, not by every worker
        vocab, meta = str(vocab_dir), {"kind": "gpt2"}
        copy_gpt2_vocab(vocab_dir, folder)
    parts = part_folder(folder, sources, tokens, vocab, skip_bad)
    encode_parts(sources, parts, tokens, vocab, skip_bad, num_proc)
    val = val_sources(len(sources), val_fraction)
    for split in SPLITS:
        with files.atomic_write(folder / f"{split}.bin") as out:
            for i in range(len(sources)):
                if (i in val) == (split == "val"):
                    with open(parts / f"{i:07d}.bin", "rb") as part:
                        shutil.copyfileobj(part, out, 16 << 20)
    write_meta(folder, meta)
    shutil.rmtree(parts)


def part_folder(folder, sources, tokens, vocab, skip_bad):
    """folder/parts, kept from an earlier, unfinished preparation of the same sources, tokens and settings, or new."""
    parts = folder / "parts"
    stamp = {"sources": [[p, *source_stamp(Path(p))[0][1:]] for p in sources], "tokens": tokens, "vocab": vocab,
             "skip_bad": skip_bad}
    if (parts / "stamp.json").is_file() and json.loads((parts / "stamp.json").read_text()) == stamp:
        files.remove_stale_temporaries(parts)
        return parts
    shutil.rmtree(parts, ignore_errors=True)
    parts.mkdir(parents=True)
    write_atomic(parts / "stamp.json", json.dumps(stamp).encode())
    return parts


def encode_parts(sources, parts, tokens, vocab, skip_bad, num_proc):
    """Encode the sources that have no part yet, in num_proc worker processes. A worker that dies (the
    out-of-memory killer, a crash in the tokenizer) stops the preparation with an error, not a hang."""
    todo = [i for i in range(len(sources)) if not (parts / f"{i:07d}.bin").is_file()]
    skipped = []
    bar = tqdm(total=len(sources), initial=len(sources) - len(todo), desc="encoding", unit="file",
               disable=len(sources) < 100)
    # spawned, not forked: a fork of a process whose threads (jax's) hold locks can hang in the child
    spawn = multiprocessing.get_context("spawn")
    num_proc = worker_count(num_proc, len(todo))
    with bar, concurrent.futures.ProcessPoolExecutor(num_proc, spawn, init_worker, (tokens, vocab, skip_bad)) as pool:
        jobs = {pool.submit(encode_source, sources[i], parts / f"{i:07d}.bin"): i for i in todo}
        try:
            for job in concurrent.futures.as_completed(jobs):
                skipped += job.result()[1]
                bar.update(1)
        except BrokenProcessPool:
            raise ValueError(f"a process encoding the documents died (killed, perhaps by the system for lack of "
                             f"memory: {num_proc} ran); run the same command again, with a lower --num_proc if memory "
                             f"is short, to go on from the {bar.n:,} of {len(sources):,} files encoded") from None
        except BaseException:
            for job in jobs:
                job.cancel()
            raise
    if skipped:
        print(f"skipped {len(skipped)} documents that are not UTF-8, e.g. {skipped[0]}", file=sys.stderr)


def worker_count(num_proc, n_sources):
    """--num_proc, at most one process per source and as many as the available memory holds (WORKER_BYTES each)."""
    available = available_bytes()
    fit = max(1, available // WORKER_BYTES) if available else num_proc
    if fit < min(num_proc, n_sources):
        print(f"note: --num_proc {num_proc}: {fit} processes of ~{WORKER_BYTES >> 20} MB fit in the "
              f"{available / 2**30:.1f} GB of memory available; using {fit}", file=sys.stderr, flush=True)
    return max(1, min(num_proc, n_sources, fit))


def available_bytes():  # the memory the system can give without swapping (Linux's MemAvailable), or None
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return None


# ------------------------------------------------------------------------------------------------- preparing

def shakespeare_text(data_dir):
    """data_dir/shakespeare_char/input.txt or data_dir/shakespeare/input.txt (a user's edited copy, say), else the
    tiny Shakespeare that ships with gptjax."""
    for name in ("shakespeare_char", "shakespeare"):
        if (Path(data_dir) / name / "input.txt").is_file():
            return Path(data_dir) / name / "input.txt"
    return SHAKESPEARE


def source_stamp(path):  # identifies the version of a user's text file or folder
    paths = [path] if path.is_file() else [Path(p) for p in text_sources(path)]
    return [[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in paths]


def prepare(dataset: str, data_dir: str | Path = "data", tokens: str | None = None, vocab_dir: Path | None = None,
            source: Path | None = None, num_proc: int = 1, skip_bad: bool = False) -> Path:
    """Prepare dataset unless it already is; returns its folder. dataset: a name (shakespeare_char, shakespeare,
    openwebtext, or a folder already under data_dir) or a path to a text file or a folder of documents. tokens:
    "char" or "gpt2" (a named dataset has its own). A text's dataset is prepared again when the text changes."""
    vocab_dir = Path(vocab_dir or encoder.GPT2_VOCAB)  # GPT-2's own vocabulary unless told another
    if not str(dataset).strip() or Path(dataset) in (Path("."), Path("/")):
        raise cli.UsageError(f"dataset {dataset!r} names no text: give shakespeare_char, shakespeare, openwebtext, a "
                             f"text file or a folder of documents")
    if tokens is not None and tokens not in TOKENS:
        raise ValueError(f"tokens must be char or gpt2, not {tokens!r}")
    if dataset in NAMED:
        if tokens not in (None, NAMED[dataset]):
            raise ValueError(f"{dataset} uses {NAMED[dataset]} tokens; for {tokens} tokens prepare the text as a file: "
                             f"`python data.py {SHAKESPEARE} --tokens={tokens}`")
        folder = Path(data_dir) / dataset
        if dataset == "openwebtext":
            if not is_prepared(folder):
                if source is None:
                    raise FileNotFoundError(f"{folder} is not prepared: OpenWebText is not downloaded for you; run "
                                            f"`python data.py openwebtext --source=FOLDER` with FOLDER holding its "
                                            f".txt documents or the .xz archives of its release")
                prepare_folder(folder, source, "gpt2", vocab_dir, OWT_VAL_FRACTION, num_proc, skip_bad)
            return folder
        return prepare_source(folder, shakespeare_text(data_dir), NAMED[dataset], vocab_dir, num_proc, skip_bad)
    path = Path(dataset)
    if not path.exists():
        folder = Path(data_dir) / dataset
        if is_prepared(folder):
            return folder
        raise cli.UsageError(f"no dataset {dataset!r}: give shakespeare_char, shakespeare, openwebtext, a folder "
                                f"prepared under {data_dir}/, or the path of a text file or folder")
    if is_shard_folder(path):  # llm.c's token shards: trained on in place
        return path
    tokens = tokens or "char"
    return prepare_source(dataset_folder(dataset, data_dir, tokens), path, tokens, vocab_dir, num_proc, skip_bad)


def prepare_source(folder, path, tokens, vocab_dir, num_proc, skip_bad):
    """folder, prepared from the text file or folder path unless it already is from this version of it."""
    stamp = {"source": str(path.resolve()), "tokens": tokens, "files": source_stamp(path)}
    stamp_path = folder / "source.json"
    if is_prepared(folder) and stamp_path.is_file() and json.loads(stamp_path.read_text()) == stamp:
        return folder
    if path.is_file():
        prepare_text(folder, path, tokens, vocab_dir)
    else:
        prepare_folder(folder, path, tokens, vocab_dir, VAL_FRACTION, num_proc, skip_bad)
    write_atomic(stamp_path, json.dumps(stamp).encode())
    return folder


def main(argv=None):
    parser = argparse.ArgumentParser(description="Prepare a dataset for train.py: token ids in train.bin/val.bin "
                                                 "and the vocabulary in meta.json.")
    parser.add_argument("dataset", help="shakespeare_char, shakespeare, openwebtext, or a text file or folder")
    parser.add_argument("--data_dir", default="data", help="where datasets are prepared (default: data)")
    parser.add_argument("--tokens", choices=TOKENS, help="for a text file or folder: char (default) or gpt2")
    parser.add_argument("--vocab_dir", help="a folder with GPT-2's encoder.json + vocab.bpe (default: the ones "
                                            "shipped in vocab/)")
    parser.add_argument("--source", help="openwebtext: the folder of its .txt documents or .xz archives")
    parser.add_argument("--num_proc", type=int, default=os.cpu_count() or 1, help="processes encoding documents")
    parser.add_argument("--to_shards", metavar="DIR", help="also write the prepared dataset (GPT-2 tokens) into DIR as "
                                                            "llm.c token shards")
    parser.add_argument("--skip_bad", action="store_true", help="leave out documents that are not UTF-8 text (they "
                                                                "are counted) instead of stopping")
    return cli.run(lambda argv: prepare_and_report(cli.parse_args(parser, argv)), argv)


def prepare_and_report(args):  # python data.py DATASET ...: prepare it and print its size
    if args.num_proc < 1:
        raise cli.UsageError(f"--num_proc must be at least 1, got {args.num_proc}")
    folder = prepare(args.dataset, args.data_dir, args.tokens, args.vocab_dir, args.source, args.num_proc,
                     args.skip_bad)
    meta = read_meta(folder)
    if args.to_shards:
        write_shards(folder, args.to_shards, Path(folder).name)
        print(f"wrote {args.to_shards}/{Path(folder).name}_{{train,val}}_*.bin (llm.c's token shards)")
    sizes = ", ".join(f"{split} {len(load_split(folder, split)):,}" if is_shard_folder(folder) else
                      f"{split} {(folder / f'{split}.bin').stat().st_size // 2:,}" for split in SPLITS)
    vocab = f"{len(meta['chars'])} characters" if meta["kind"] == "char" else "GPT-2 BPE"
    print(f"{folder}: {sizes} tokens ({vocab})")


if __name__ == "__main__":
    sys.exit(main())
