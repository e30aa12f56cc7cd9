"""GPT-2's byte-level BPE tokenizer, and the character vocabulary of char-level models.

    enc = get_encoder("models/124M")
    ids = enc.encode("Hello world")   # [15496, 995]
    text = enc.decode(ids)            # "Hello world"
    enc.n_vocab, enc.eot_token        # 50257, 50256

get_encoder(folder) reads, in this order of preference:
  - encoder.json + vocab.bpe: OpenAI's release (token string -> id, and the merges in rank order);
  - vocab.json + merges.txt: the same two files under Hugging Face's names;
  - meta.json: {"kind": "char", "chars": [...]}, the character vocabulary that data.py writes for char-level models.

Byte-level BPE, as in OpenAI's encoder.py: the text is pre-split by a regex into words (letters, digits, other
symbols, whitespace, English contractions), each word's UTF-8 bytes are spelled as printable characters through a
fixed byte -> character table, and the adjacent pair with the lowest merge rank is merged until no pair in the word
has a rank. Two implementations give the same ids:
  - tiktoken (the default; about 5x faster: 0.2 s against 1 s for tiny Shakespeare's 1 MB), built from the same
    local files, no download. tiktoken ranks a merge by the id of the token it makes, so it is used only when the
    vocabulary satisfies that: the 256 bytes plus one token per merge, with ids rising in merge order (the check
    tiktoken itself makes when it loads GPT-2's files). Any other vocabulary falls back to the pure path;
  - pure Python (fast=False): the reference, with each word's ids cached.

Special token: encode(text) reads the literal string "<|endoftext|>" as the end-of-text token (50256), like tiktoken's
encode(text, allowed_special="all"): it is how documents are separated in GPT-2's training data and in prompts.
encode_ordinary(text) encodes it as plain text (<, |, endoftext, |, >). Vocabularies without that token have
eot_token None, and both methods then treat the string as plain text.

decode(ids) joins the tokens' bytes and decodes them as UTF-8 with errors="replace", as OpenAI does: a token sequence
cut inside a multi-byte character decodes to U+FFFD instead of raising.
"""
import functools
import json
from pathlib import Path

import numpy as np
import regex
import tiktoken

# OpenAI's pre-split: contractions, runs of letters / digits / other symbols (each with one optional leading space),
# and whitespace, where a run of spaces before a word leaves its last space to that word.
PRE_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
PRE_SPLIT_RE = regex.compile(PRE_SPLIT)
EOT = "<|endoftext|>"
BPE_FILE_PAIRS = (("encoder.json", "vocab.bpe"), ("vocab.json", "merges.txt"))
CHAR_FILE = "meta.json"
# GPT-2's own encoder.json + vocab.bpe (OpenAI's release, MIT; vocab/LICENSE), shipped so that tokenizing never
# needs the network: for models saved without a tokenizer, and for datasets tokenized with GPT-2's BPE
GPT2_VOCAB = Path(__file__).resolve().parent / "vocab"
GPT2_FILES = ("encoder.json", "vocab.bpe")  # GPT-2's vocabulary, as OpenAI released it


def bytes_to_unicode() -> dict[int, str]:
    """{byte: character}: printable bytes stand for themselves, the other 68 (control characters, space, ...) for
    the characters from U+0100 on, so every token is a string of visible characters with no whitespace in it."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    table, n_moved = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + n_moved)
            n_moved += 1
    return table


BYTE_TO_CHAR = bytes_to_unicode()
CHAR_TO_BYTE = {c: b for b, c in BYTE_TO_CHAR.items()}


def as_id_list(ids):
    """A 1-D sequence of token ids (list, numpy or jax array) as a list of Python ints."""
    ids = np.asarray(ids)
    if ids.ndim != 1 or (ids.size and ids.dtype.kind not in "iu"):
        raise ValueError(f"decode takes a 1-D sequence of integer token ids, got {ids.dtype} of shape {ids.shape}")
    return ids.tolist()


def bpe_merge(chars, ranks):
    """The BPE tokens of one word spelled in byte-characters: merge the adjacent pair with the lowest rank (every
    occurrence of it, left to right) until no adjacent pair has a rank."""
    parts = list(chars)
    while len(parts) > 1:
        ranked = [(ranks[pair], pair) for pair in zip(parts, parts[1:]) if pair in ranks]
        if not ranked:
            break
        best = min(ranked)[1]
        merged, i = [], 0
        while i < len(parts):
            if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
                merged.append(parts[i] + parts[i + 1])
                i += 2
            else:
                merged.append(parts[i])
                i += 1
        parts = merged
    return parts


class BPEEncoder:
    """GPT-2's byte-level BPE over a vocabulary {token string: id} and a list of merges (pairs, in rank order)."""

    def __init__(self, vocab, merges, fast=True, source="the vocabulary"):
        check_bpe_vocab(vocab, merges, source)
        self.vocab = vocab
        self.ranks = {pair: rank for rank, pair in enumerate(merges)}
        self.token_bytes = {i: bytes(CHAR_TO_BYTE[c] for c in token) for token, i in vocab.items()}
        self.n_vocab = max(vocab.values()) + 1
        self.eot_token = vocab.get(EOT)
        self.tiktoken = tiktoken_encoding(vocab, merges) if fast and ranks_are_ids(vocab, merges) else None
        self.fast = self.tiktoken is not None
        # Words repeat (Zipf), so most of a text's BPE work is a dict look-up after the first few KB.
        self.word_ids = functools.lru_cache(maxsize=1 << 17)(self.bpe_word)

    def bpe_word(self, word):
        """Token ids of one pre-split word."""
        chars = "".join(BYTE_TO_CHAR[b] for b in word.encode("utf-8"))
        return tuple(self.vocab[token] for token in bpe_merge(chars, self.ranks))

    def encode_ordinary(self, text):
        """Token ids of text, with "<|endoftext|>" read as plain text."""
        if self.tiktoken is not None:
            return self.tiktoken.encode_ordinary(text)
        if not text.isascii():  # lone surrogates cannot be UTF-8: replace them with U+FFFD, as tiktoken does
            text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
        return [i for word in PRE_SPLIT_RE.findall(text) for i in self.word_ids(word)]

    def encode(self, text):
        """Token ids of text, with each "<|endoftext|>" in it as the end-of-text token."""
        if self.eot_token is None:
            return self.encode_ordinary(text)
        ids = []
        for n, piece in enumerate(text.split(EOT)):
            if n:
                ids.append(self.eot_token)
            ids.extend(self.encode_ordinary(piece))
        return ids

    def decode(self, ids):
        """The text of token ids; bytes that are not whole UTF-8 characters become U+FFFD."""
        try:
            data = b"".join([self.token_bytes[i] for i in as_id_list(ids)])
        except KeyError as e:
            raise ValueError(f"token id {e.args[0]} is not in the vocabulary (ids 0..{self.n_vocab - 1})") from None
        return data.decode("utf-8", errors="replace")


class CharEncoder:
    """A character vocabulary: each character is one token, its id its index in chars."""

    def __init__(self, chars):
        self.chars = chars
        self.index = {c: i for i, c in enumerate(chars)}
        self.n_vocab = len(chars)
        self.eot_token = None

    def encode(self, text):
        """Token ids of text, one per character."""
        try:
            return [self.index[c] for c in text]
        except KeyError as e:
            raise ValueError(f"character {e.args[0]!r} (at position {text.index(e.args[0])}) is not in this model's "
                             f"vocabulary of {self.n_vocab} characters; use only characters of its training text") \
                from None

    encode_ordinary = encode

    def decode(self, ids):
        """The text of token ids."""
        ids = as_id_list(ids)
        bad = [i for i in ids if not 0 <= i < self.n_vocab]
        if bad:
            raise ValueError(f"token id {bad[0]} is not in the vocabulary (ids 0..{self.n_vocab - 1})")
        return "".join([self.chars[i] for i in ids])


def check_bpe_vocab(vocab, merges, source):
    """Raise ValueError unless every token is spelled in byte-characters, every byte is a token, and every merge joins
    two tokens into a token (so encoding can never meet a string without an id)."""
    for token in vocab:
        if not token or any(c not in CHAR_TO_BYTE for c in token):
            raise ValueError(f"token {token!r} in {source} is not in GPT-2's byte-level spelling; "
                             f"is this a GPT-2-style BPE vocabulary?")
    missing = [c for c in BYTE_TO_CHAR.values() if c not in vocab]
    if missing:
        raise ValueError(f"{source} has no token for the byte {CHAR_TO_BYTE[missing[0]]:#04x} "
                         f"({len(missing)} of the 256 bytes are missing); byte-level BPE needs all 256")
    for rank, (a, b) in enumerate(merges):
        if a not in vocab or b not in vocab or a + b not in vocab:
            raise ValueError(f"merge {rank} ({a!r} + {b!r}) in {source} uses or makes a token that is not in the "
                             f"vocabulary; the vocabulary and merges files do not belong together")


def ranks_are_ids(vocab, merges):
    """Whether tiktoken, which ranks a merge by the id of the token it makes, merges as the merges list does: the
    vocabulary is the 256 bytes plus one token per merge (and <|endoftext|>), with ids rising in merge order."""
    ids = [vocab[a + b] for a, b in merges]
    rising = all(x < y for x, y in zip(ids, ids[1:]))
    return rising and len(vocab) - (EOT in vocab) == 256 + len(merges)


def tiktoken_encoding(vocab, merges):
    """A tiktoken Encoding over the same vocabulary: {token bytes: id}, with <|endoftext|> as a special token."""
    ranks = {bytes(CHAR_TO_BYTE[c] for c in token): i for token, i in vocab.items() if token != EOT}
    special = {EOT: vocab[EOT]} if EOT in vocab else {}
    return tiktoken.Encoding(name="gpt2-local", pat_str=PRE_SPLIT, mergeable_ranks=ranks, special_tokens=special)


def read_vocab(path):
    """{token string: id} from encoder.json / vocab.json."""
    try:
        vocab = json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); replace it with the model's own file") from None
    if not isinstance(vocab, dict) or not vocab or not all(type(i) is int and i >= 0 for i in vocab.values()):
        raise ValueError(f"{path} should map token strings to non-negative integer ids")
    return vocab


def read_merges(path):
    """[(first, second), ...] in rank order from vocab.bpe / merges.txt: one pair per line after a #version line."""
    merges = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or (n == 1 and line.startswith("#version")):
            continue
        pair = line.split()
        if len(pair) != 2:
            raise ValueError(f"{path} line {n} should hold two tokens separated by a space, got {line!r}")
        merges.append(tuple(pair))
    return merges


def bpe_encoder(vocab_path: Path, merges_path: Path, fast: bool = True):
    """BPEEncoder from encoder.json + vocab.bpe (or vocab.json + merges.txt); fast=False forces the pure path."""
    return BPEEncoder(read_vocab(vocab_path), read_merges(merges_path), fast=fast, source=str(vocab_path))


def char_encoder(meta_path: Path):
    """CharEncoder from meta.json: {"kind": "char", "chars": [single-character strings in id order]}."""
    try:
        meta = json.loads(Path(meta_path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{meta_path} is not valid JSON ({e}); rewrite it with data.py") from None
    if not isinstance(meta, dict) or meta.get("kind") != "char" or not isinstance(meta.get("chars"), (list, str)):
        raise ValueError(f'{meta_path} should hold {{"kind": "char", "chars": [...]}}, a character vocabulary')
    chars = list(meta["chars"])
    if not chars or not all(isinstance(c, str) and len(c) == 1 for c in chars) or len(set(chars)) != len(chars):
        raise ValueError(f'"chars" in {meta_path} should be a non-empty list of distinct single characters')
    return CharEncoder(chars)


def get_encoder(model_dir: str | Path, fast: bool = True):
    """The tokenizer stored in model_dir: BPEEncoder (encoder.json + vocab.bpe, or vocab.json + merges.txt) or
    CharEncoder (meta.json). Each has encode(text) -> ids, decode(ids) -> text, n_vocab and eot_token."""
    folder = Path(model_dir)
    for vocab_name, merges_name in BPE_FILE_PAIRS:
        if (folder / vocab_name).is_file() and (folder / merges_name).is_file():
            return bpe_encoder(folder / vocab_name, folder / merges_name, fast=fast)
    if (folder / CHAR_FILE).is_file():
        return char_encoder(folder / CHAR_FILE)
    found = [name for pair in BPE_FILE_PAIRS for name in pair if (folder / name).is_file()]
    found = f" (found only {', '.join(found)})" if found else ""
    raise FileNotFoundError(f"no tokenizer in {folder}{found}: expected encoder.json + vocab.bpe, "
                            f"vocab.json + merges.txt, or meta.json")
