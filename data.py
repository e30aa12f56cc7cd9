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

Tiny Shakespeare is read from {data_dir}/shakespeare_char/input.txt (or shakespeare/input.txt), downloaded there from
karpathy/char-rnn when it is in neither place; put it there by hand to work offline. OpenWebText is not downloaded
(about 40 GB of text and 12 GB of tokens): point --source at a folder of its .txt documents, or at the folder of .xz
archives that the original release (Skylion007's openwebtext.tar.xz) unpacks to; these are read with the standard
library, nothing else is needed. GPT-2's vocabulary files are the ones shipped in vocab/ (or --vocab_dir's).

Batches (get_batch) gather block_size + 1 tokens at a few random offsets from the memmap, so a dataset larger than
memory trains just as well; only the pages touched are read.
"""
import argparse
import json
import multiprocessing
import os
import sys
import tarfile
from pathlib import Path

import numpy as np
from tqdm import tqdm

import cli
import encoder
import files
from download import download

SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
NAMED = {"shakespeare_char": "char", "shakespeare": "gpt2", "openwebtext": "gpt2"}  # name -> its tokens
TOKENS = ("char", "gpt2")
GPT2_FILES = ("encoder.json", "vocab.bpe")
TRAIN_FRACTION = 0.9       # of one text's characters, as nanoGPT
VAL_FRACTION = 0.1         # of a folder's documents
OWT_VAL_FRACTION = 0.0005  # OpenWebText: nanoGPT's split, about 4,000 documents
SPLIT_SEED = 2357          # which documents of a folder go to val (nanoGPT's OpenWebText seed)
SPLITS = ("train", "val")


# ---------------------------------------------------------------------------------------------------- reading

def is_prepared(folder):
    return all((Path(folder) / name).is_file() for name in ("train.bin", "val.bin", "meta.json"))


def dataset_folder(dataset, data_dir, tokens=None):
    """Where `dataset` is (or will be) prepared: a name under data_dir, or for a path to text, a folder named after
    it and its tokens: data/notes.txt with char tokens -> data_dir/notes_char."""
    if dataset in NAMED or not (os.sep in dataset or "/" in dataset or Path(dataset).exists()):
        return Path(data_dir) / dataset
    return Path(data_dir) / f"{Path(dataset).stem}_{tokens}"


def load_split(folder, split):  # -> [n_tokens] uint16 memmap
    path = Path(folder) / f"{split}.bin"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: prepare the dataset with `python data.py {Path(folder).name}`")
    if path.stat().st_size < 2:
        raise ValueError(f"{path} is empty: prepare the dataset again from more text")
    return np.memmap(path, dtype=np.uint16, mode="r")


def read_meta(folder):
    path = Path(folder) / "meta.json"
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} does not exist: prepare the dataset with `python data.py`") from None
    except ValueError as e:
        raise ValueError(f"{path} is not valid JSON ({e}): prepare the dataset again") from None
    if not isinstance(meta, dict) or meta.get("kind") not in TOKENS:
        raise ValueError(f'{path} should hold {{"kind": "char", "chars": [...]}} or {{"kind": "gpt2"}}')
    return meta


def batch_starts(n_tokens, block_size, batch_size, seed, it, split):  # -> [batch_size] int64 offsets
    """Random offsets of batch `it` of split, a pure function of its arguments: resuming at iteration it draws the
    same batches as a run that never stopped, with no sampler state to save."""
    if n_tokens <= block_size:
        raise ValueError(f"the {split} split has {n_tokens} tokens, too few for block_size {block_size}: use a smaller "
                         f"--block_size or more text")
    rng = np.random.default_rng([seed, SPLITS.index(split), it])
    return rng.integers(0, n_tokens - block_size, size=batch_size)


def get_batch(data, starts, block_size):  # [n_tokens] memmap, [B] -> x [B, block_size] int32, y: x shifted by one
    window = data[starts[:, None] + np.arange(block_size + 1)].astype(np.int32)  # reads only these tokens
    return window[:, :-1], window[:, 1:]


# ----------------------------------------------------------------------------------------------------- writing

def write_atomic(path, data):  # bytes -> path: path is whole or as it was, never half-written
    with files.atomic_write(path) as f:
        f.write(data)


def write_tokens(path, pieces):
    """Append each array of ids in pieces (an iterable) to path as uint16, atomically. Returns the count."""
    n = 0
    with files.atomic_write(path) as f:
        for ids in pieces:
            ids = np.asarray(ids)
            if ids.size and ids.max() > np.iinfo(np.uint16).max:
                raise ValueError(f"token id {int(ids.max())} does not fit in uint16; vocabularies of at most "
                                 f"65,536 tokens are supported")
            f.write(ids.astype(np.uint16).tobytes())
            n += ids.size
    return n


def write_meta(folder, meta):
    write_atomic(Path(folder) / "meta.json", json.dumps(meta, ensure_ascii=False).encode("utf-8"))


def char_vocab(text):  # every character that occurs, sorted: nanoGPT's shakespeare_char vocabulary
    chars = sorted(set(text))
    if len(chars) > 1 << 16:
        raise ValueError(f"the text has {len(chars)} distinct characters; at most 65,536 fit in uint16 tokens")
    return chars


def char_encoder(chars):  # -> text -> [n_chars] int64 ids, by a table look-up on the code points
    table = np.full(max(map(ord, chars)) + 1, -1, np.int64)
    table[[ord(c) for c in chars]] = np.arange(len(chars))
    return lambda text: table[np.frombuffer(text.encode("utf-32-le"), np.uint32)]


def gpt2_encoder(vocab_dir):
    """GPT-2's tokenizer from vocab_dir (encoder.json + vocab.bpe)."""
    vocab_dir = Path(vocab_dir)
    missing = [name for name in GPT2_FILES if not (vocab_dir / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{vocab_dir} lacks {', '.join(missing)}: give a --vocab_dir that holds GPT-2's "
                                f"encoder.json and vocab.bpe, or leave it out to use the ones in {encoder.GPT2_VOCAB}")
    return encoder.get_encoder(vocab_dir)


def copy_gpt2_vocab(vocab_dir, folder):
    for name in GPT2_FILES:
        write_atomic(Path(folder) / name, (Path(vocab_dir) / name).read_bytes())


def prepare_text(folder, text, tokens, vocab_dir):
    """One text -> folder/{train,val}.bin + meta.json: the first 90% of its characters train, the rest validate."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    files.remove_stale_temporaries(folder)  # what a preparation killed mid-write left behind
    (folder / "meta.json").unlink(missing_ok=True)  # unfinished until it is written again
    if len(text) < 2:
        raise ValueError(f"the text for {folder} has {len(text)} characters: too little to train on")
    cut = int(len(text) * TRAIN_FRACTION)
    if tokens == "char":
        chars = char_vocab(text)
        encode, meta = char_encoder(chars), {"kind": "char", "chars": chars}
    else:
        encode, meta = gpt2_encoder(vocab_dir).encode_ordinary, {"kind": "gpt2"}
        copy_gpt2_vocab(vocab_dir, folder)
    counts = {split: write_tokens(folder / f"{split}.bin", [encode(part)])
              for split, part in zip(SPLITS, (text[:cut], text[cut:]))}
    write_meta(folder, meta)
    return counts


# ---------------------------------------------------------------------------------------------- document folders

ARCHIVES = (".tar", ".tar.gz", ".tgz", ".tar.xz", ".xz", ".tar.bz2")


def text_sources(root):  # the files under root, sorted, hidden ones skipped: text files or archives of them
    return sorted(str(p) for p in Path(root).rglob("*") if p.is_file() and not p.name.startswith("."))


def is_archive(path):
    return path.endswith(ARCHIVES) and tarfile.is_tarfile(path)


def read_documents(path):
    """The documents of one source: a text file is one; an archive (OpenWebText's .xz files are tar archives of
    .txt documents) holds one per member file, read in name order with a single pass over the archive."""
    try:
        if not is_archive(path):
            return [Path(path).read_text(encoding="utf-8")]
        with tarfile.open(path) as archive:
            members = sorted((m for m in archive.getmembers() if m.isfile()), key=lambda m: m.name)
            return [archive.extractfile(m).read().decode("utf-8") for m in members]
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}); remove it from the folder or "
                         f"convert it") from None


def val_sources(n_sources, fraction):  # a fixed random choice of the sources that validate (at least one)
    n_val = min(max(1, round(n_sources * fraction)), n_sources - 1)
    return set(np.random.default_rng(SPLIT_SEED).permutation(n_sources)[:n_val].tolist())


WORKER = {}  # each encoding process's tokenizer


def init_worker(tokens, vocab):  # vocab: the characters, or the folder of GPT-2's vocabulary files
    if tokens == "gpt2":
        enc = gpt2_encoder(vocab)
        WORKER["encode"] = lambda text: enc.encode_ordinary(text) + [enc.eot_token]  # documents end with EOT
    else:
        WORKER["encode"] = char_encoder(vocab)


def encode_source(path):  # -> uint16 ids of every document of one source, one after the other
    return np.concatenate([np.asarray(WORKER["encode"](text), np.int64) for text in read_documents(path)] +
                          [np.zeros(0, np.int64)])


def prepare_folder(folder, root, tokens, vocab_dir, val_fraction=VAL_FRACTION, num_proc=1):
    """Every document under root -> folder/{train,val}.bin + meta.json, encoded in num_proc processes. The split is
    by source file: val_fraction of them (at least one) validate."""
    folder, sources = Path(folder), text_sources(root)
    if len(sources) == 1 and not is_archive(sources[0]):
        return prepare_text(folder, read_documents(sources[0])[0], tokens, vocab_dir)
    if len(sources) < 2:
        raise ValueError(f"{root} holds {len(sources)} files; a folder needs at least two to split into train and "
                         f"val (or give the text file itself)")
    folder.mkdir(parents=True, exist_ok=True)
    files.remove_stale_temporaries(folder)
    (folder / "meta.json").unlink(missing_ok=True)
    if tokens == "char":  # the vocabulary must be known before encoding: one pass to collect the characters
        chars = set()
        for path in sources:
            for text in read_documents(path):
                chars.update(text)
        vocab = char_vocab(chars)
        meta = {"kind": "char", "chars": vocab}
    else:
        gpt2_encoder(vocab_dir)  # a missing vocabulary is reported once, here, not by every worker
        vocab, meta = str(vocab_dir), {"kind": "gpt2"}
        copy_gpt2_vocab(vocab_dir, folder)
    val = val_sources(len(sources), val_fraction)
    counts = {}
    for split in SPLITS:
        chosen = [path for i, path in enumerate(sources) if (i in val) == (split == "val")]
        if num_proc > 1:
            with multiprocessing.Pool(num_proc, init_worker, (tokens, vocab)) as pool:
                pieces = pool.imap(encode_source, chosen, chunksize=4)
                counts[split] = write_tokens(folder / f"{split}.bin", progress(pieces, len(chosen), split))
        else:
            init_worker(tokens, vocab)
            counts[split] = write_tokens(folder / f"{split}.bin",
                                         progress(map(encode_source, chosen), len(chosen), split))
    write_meta(folder, meta)
    return counts


def progress(pieces, total, split):
    return tqdm(pieces, total=total, desc=f"encoding {split}", unit="file", disable=total < 100)


# ------------------------------------------------------------------------------------------------- preparing

def shakespeare_text(data_dir):
    """Tiny Shakespeare from data_dir/shakespeare_char/input.txt or data_dir/shakespeare/input.txt, downloaded into
    the first when it is in neither."""
    places = [Path(data_dir) / name / "input.txt" for name in ("shakespeare_char", "shakespeare")]
    for path in places:
        if path.is_file():
            return path.read_text(encoding="utf-8")
    places[0].parent.mkdir(parents=True, exist_ok=True)
    try:
        download(SHAKESPEARE_URL, places[0])
    except (ConnectionError, FileNotFoundError) as e:
        raise ConnectionError(f"{e}; to work offline, put tiny Shakespeare's input.txt at {places[0]}") from None
    return places[0].read_text(encoding="utf-8")


def source_stamp(path):  # identifies the version of a user's text file or folder
    paths = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return [[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in paths]


def prepare(dataset, data_dir="data", tokens=None, vocab_dir=None, source=None, num_proc=1):
    """Prepare dataset unless it already is; returns its folder. dataset: a name (shakespeare_char, shakespeare,
    openwebtext, or a folder already under data_dir) or a path to a text file or a folder of documents. tokens:
    "char" or "gpt2" (a named dataset has its own). A text's dataset is prepared again when the text changes."""
    vocab_dir = Path(vocab_dir or encoder.GPT2_VOCAB)  # GPT-2's own vocabulary unless told another
    if tokens is not None and tokens not in TOKENS:
        raise ValueError(f"tokens must be char or gpt2, not {tokens!r}")
    if dataset in NAMED:
        if tokens not in (None, NAMED[dataset]):
            raise ValueError(f"{dataset} uses {NAMED[dataset]} tokens; for {tokens} tokens prepare the text as a file: "
                             f"`python data.py {data_dir}/shakespeare_char/input.txt --tokens={tokens}`")
        folder = Path(data_dir) / dataset
        if not is_prepared(folder):
            if dataset == "openwebtext":
                if source is None:
                    raise FileNotFoundError(f"{folder} is not prepared: OpenWebText is not downloaded for you; run "
                                            f"`python data.py openwebtext --source=FOLDER` with FOLDER holding its "
                                            f".txt documents or the .xz archives of its release")
                prepare_folder(folder, source, "gpt2", vocab_dir, OWT_VAL_FRACTION, num_proc)
            else:
                prepare_text(folder, shakespeare_text(data_dir), NAMED[dataset], vocab_dir)
        return folder
    path = Path(dataset)
    if not path.exists():
        folder = Path(data_dir) / dataset
        if is_prepared(folder):
            return folder
        raise FileNotFoundError(f"no dataset {dataset!r}: give shakespeare_char, shakespeare, openwebtext, a folder "
                                f"prepared under {data_dir}/, or the path of a text file or folder")
    tokens = tokens or "char"
    folder = dataset_folder(dataset, data_dir, tokens)
    stamp = {"source": str(path.resolve()), "tokens": tokens, "files": source_stamp(path)}
    stamp_path = folder / "source.json"
    if is_prepared(folder) and stamp_path.is_file() and json.loads(stamp_path.read_text()) == stamp:
        return folder
    if path.is_file():
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
        prepare_text(folder, text, tokens, vocab_dir)
    else:
        prepare_folder(folder, path, tokens, vocab_dir, VAL_FRACTION, num_proc)
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
    return cli.run(lambda argv: prepare_and_report(parser.parse_args(argv)), argv)


def prepare_and_report(args):  # python data.py DATASET ...: prepare it and print its size
    folder = prepare(args.dataset, args.data_dir, args.tokens, args.vocab_dir, args.source, args.num_proc)
    meta = read_meta(folder)
    sizes = ", ".join(f"{split} {load_split(folder, split).size:,}" for split in SPLITS)
    vocab = f"{len(meta['chars'])} characters" if meta["kind"] == "char" else "GPT-2 BPE"
    print(f"{folder}: {sizes} tokens ({vocab})")


if __name__ == "__main__":
    sys.exit(main())
