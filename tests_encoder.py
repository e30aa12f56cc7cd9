"""Tests of encoder.py. References: tiktoken's GPT-2 ids in testdata/tokenizer_cases.json (checked there against a
separate implementation of OpenAI's encoder.py), the fixture README's token count of tiny Shakespeare (338,025),
tiktoken's Rust BPE against our pure-Python one on all of tiny Shakespeare, and small vocabularies worked by hand."""
import json
import pathlib
import random
import shutil
import time

import numpy as np
import pytest

import encoder

HERE = pathlib.Path(__file__).parent
ENCODER_GPT2_DIR = HERE / "testdata" / "gpt2-tiny"
ENCODER_CASES = json.loads((HERE / "testdata" / "tokenizer_cases.json").read_text(encoding="utf-8"))
ENCODER_SHAKESPEARE = HERE / "testdata" / "tinyshakespeare" / "input.txt"
ENCODER_SHAKESPEARE_TOKENS = 338_025  # testdata README


@pytest.fixture(scope="module")
def encoder_fast():
    return encoder.bpe_encoder(ENCODER_GPT2_DIR / "encoder.json", ENCODER_GPT2_DIR / "vocab.bpe", fast=True)


@pytest.fixture(scope="module")
def encoder_pure():
    return encoder.bpe_encoder(ENCODER_GPT2_DIR / "encoder.json", ENCODER_GPT2_DIR / "vocab.bpe", fast=False)


@pytest.fixture(scope="module", params=["fast", "pure"])
def encoder_gpt2(request, encoder_fast, encoder_pure):
    return encoder_fast if request.param == "fast" else encoder_pure


def encoder_write_tiny_vocab(folder, merges, extra_ids=()):
    """A GPT-2-style vocabulary: the 256 bytes (ids 0..255), then one token per merge, in order."""
    vocab = {c: b for b, c in encoder.BYTE_TO_CHAR.items()}
    for a, b in merges:
        vocab[a + b] = len(vocab)
    vocab.update(extra_ids)
    (folder / "encoder.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "vocab.bpe").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    return vocab


# ------------------------------------------------------------------------------------------------ GPT-2 BPE

def test_encoder_paths_are_what_they_claim(encoder_fast, encoder_pure):
    assert encoder_fast.fast and encoder_fast.tiktoken is not None  # GPT-2's files pass the rank == id check
    assert not encoder_pure.fast and encoder_pure.tiktoken is None
    for enc in (encoder_fast, encoder_pure):
        assert enc.n_vocab == 50257 and enc.eot_token == 50256


@pytest.mark.parametrize("case", ENCODER_CASES, ids=lambda case: repr(case["text"])[:30])
def test_encoder_matches_tiktoken_ids(encoder_gpt2, case):
    assert encoder_gpt2.encode_ordinary(case["text"]) == case["ids"]
    assert encoder_gpt2.encode(case["text"]) == case.get("ids_allowed_special", case["ids"])
    assert encoder_gpt2.decode(case["ids"]) == case["text"]
    assert encoder_gpt2.decode(encoder_gpt2.encode(case["text"])) == case["text"]


def test_encoder_endoftext_is_special_only_in_encode(encoder_gpt2):
    # The fixture has one text with <|endoftext|>; check the rule on the edges too: start, end, repeated.
    hello = [15496]  # "Hello", from the fixture's "Hello world"
    assert encoder_gpt2.encode("<|endoftext|>Hello<|endoftext|><|endoftext|>") == [50256, *hello, 50256, 50256]
    assert 50256 not in encoder_gpt2.encode_ordinary("<|endoftext|>")
    assert encoder_gpt2.decode([50256]) == "<|endoftext|>"


def test_encoder_decode_partial_utf8_replaces(encoder_gpt2):
    ids = encoder_gpt2.encode("日")
    assert len(ids) == 2 and encoder_gpt2.decode(ids) == "日"
    # The first token holds only part of the character's 3 UTF-8 bytes: OpenAI's errors="replace" gives U+FFFD.
    assert set(encoder_gpt2.decode(ids[:1])) == {"\ufffd"}


def test_encoder_decode_accepts_arrays_and_rejects_bad_ids(encoder_gpt2):
    assert encoder_gpt2.decode(np.array([15496, 995], dtype=np.int32)) == "Hello world"
    assert encoder_gpt2.decode([]) == ""
    for bad in ([50257], [-1]):
        with pytest.raises(ValueError, match=r"token id -?\d+ is not in the vocabulary"):
            encoder_gpt2.decode(bad)
    with pytest.raises(ValueError, match="1-D"):
        encoder_gpt2.decode([[15496, 995]])


def test_encoder_shakespeare_count_and_paths_agree(encoder_fast, encoder_pure):
    text = ENCODER_SHAKESPEARE.read_text(encoding="utf-8")
    start = time.perf_counter()
    fast = encoder_fast.encode(text)
    fast_s = time.perf_counter() - start
    start = time.perf_counter()
    pure = encoder_pure.encode(text)
    pure_s = time.perf_counter() - start
    assert len(fast) == ENCODER_SHAKESPEARE_TOKENS
    assert pure == fast
    assert encoder_fast.decode(fast) == text
    print(f"tiny shakespeare: tiktoken {fast_s:.2f} s, pure {pure_s:.2f} s")


def test_encoder_paths_agree_on_random_unicode(encoder_fast, encoder_pure):
    # Strings drawn from the character classes the pre-split regex separates, to reach its corners.
    pieces = ["a", "Z", "é", "ß", "日", "й", "7", "٣", "½", " ", "  ", "\t", "\n", "\r\n", "\u00a0", "\u3000", "'s",
              "'LL", "'", "!", "...", "😀", "🏽", "\u200d", "<|endoftext|>", "<|", "\ud800", "ǅ", "\u0301"]
    rng = random.Random(0)
    for _ in range(300):
        text = "".join(rng.choice(pieces) for _ in range(rng.randrange(1, 40)))
        assert encoder_pure.encode(text) == encoder_fast.encode(text), repr(text)
        assert encoder_pure.encode_ordinary(text) == encoder_fast.encode_ordinary(text), repr(text)


# ------------------------------------------------------------------------------------------------ other vocabularies

def test_encoder_tiny_vocab_by_hand(tmp_path):
    merges = [("h", "e"), ("l", "l"), ("he", "ll"), ("Ġ", "w"), ("Ġw", "o")]
    vocab = encoder_write_tiny_vocab(tmp_path, merges)  # he 256, ll 257, hell 258, Ġw 259, Ġwo 260
    for fast in (True, False):
        enc = encoder.bpe_encoder(tmp_path / "encoder.json", tmp_path / "vocab.bpe", fast=fast)
        assert enc.fast == fast and enc.n_vocab == 261 and enc.eot_token is None
        # "hello" -> he ll o -> hell o; " world" -> Ġw o r l d -> Ġwo r l d
        assert enc.encode("hello world") == [258, vocab["o"], 260, vocab["r"], vocab["l"], vocab["d"]]
        # No <|endoftext|> in this vocabulary: the string is plain text for encode too.
        assert enc.encode("<|endoftext|>") == [vocab[c] for c in "<|endoftext|>"]
        assert enc.decode(enc.encode("hello world")) == "hello world"


def test_encoder_falls_back_to_pure_when_ranks_are_not_ids(tmp_path, encoder_fast):
    # Swap the ids of the first two merged tokens ("Ġt" 256, "Ġa" 257): merges still segment text the same way, but
    # tiktoken's rank == id assumption breaks, so the fast path must not be used.
    vocab = json.loads((ENCODER_GPT2_DIR / "encoder.json").read_text(encoding="utf-8"))
    a, b = (token for token, i in vocab.items() if i in (256, 257))
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (tmp_path / "encoder.json").write_text(json.dumps(vocab), encoding="utf-8")
    enc = encoder.bpe_encoder(tmp_path / "encoder.json", ENCODER_GPT2_DIR / "vocab.bpe", fast=True)
    assert not enc.fast
    text = "x t a tx ax the cat"
    swap = {256: 257, 257: 256}
    expected = [swap.get(i, i) for i in encoder_fast.encode(text)]
    assert 256 in expected and 257 in expected
    assert enc.encode(text) == expected
    assert enc.decode(expected) == text


def test_encoder_extra_token_falls_back_to_pure(tmp_path):
    merges = [("h", "e")]
    vocab = encoder_write_tiny_vocab(tmp_path, merges, extra_ids={"hel": 257})  # a token no merge makes
    enc = encoder.get_encoder(tmp_path)
    assert not enc.fast  # tiktoken would merge "he" + "l" into "hel"; OpenAI's BPE never does
    assert enc.encode("hell") == [256, vocab["l"], vocab["l"]]


def test_encoder_hf_file_names(tmp_path, encoder_fast):
    shutil.copy(ENCODER_GPT2_DIR / "encoder.json", tmp_path / "vocab.json")
    shutil.copy(ENCODER_GPT2_DIR / "vocab.bpe", tmp_path / "merges.txt")
    enc = encoder.get_encoder(tmp_path)
    assert enc.fast and enc.eot_token == 50256
    for case in ENCODER_CASES:
        assert enc.encode(case["text"]) == case.get("ids_allowed_special", case["ids"])


def test_encoder_prefers_openai_files(tmp_path):
    vocab = encoder_write_tiny_vocab(tmp_path, [("a", "b")])
    (tmp_path / "meta.json").write_text(json.dumps({"kind": "char", "chars": ["a", "b"]}), encoding="utf-8")
    (tmp_path / "vocab.json").write_text("not read", encoding="utf-8")
    (tmp_path / "merges.txt").write_text("not read", encoding="utf-8")
    assert encoder.get_encoder(tmp_path).encode("ab") == [vocab["ab"]]


def test_encoder_char_vocabulary(tmp_path):
    chars = sorted(set("First Citizen:\nBefore we proceed any further, hear me speak."))
    (tmp_path / "meta.json").write_text(json.dumps({"kind": "char", "chars": chars}), encoding="utf-8")
    enc = encoder.get_encoder(tmp_path)
    text = "hear me speak, Citizen\n"
    assert enc.encode(text) == [chars.index(c) for c in text]
    assert enc.decode(enc.encode(text)) == text
    assert enc.n_vocab == len(chars) and enc.eot_token is None
    with pytest.raises(ValueError, match=r"^character 'Z' \(at position 5\) is not in this model's vocabulary") as e:
        enc.encode("hear Zoe")
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="token id 99 is not in the vocabulary"):
        enc.decode([0, 99])


@pytest.mark.parametrize("meta", [{"chars": ["a"]}, {"kind": "bpe", "chars": ["a"]}, {"kind": "char", "chars": []},
                                  {"kind": "char", "chars": ["a", "bc"]}, {"kind": "char", "chars": ["a", "a"]}, []])
def test_encoder_bad_meta_json(tmp_path, meta):
    (tmp_path / "meta.json").write_text(json.dumps(meta), encoding="utf-8")
    with pytest.raises(ValueError, match="meta.json") as e:
        encoder.get_encoder(tmp_path)
    assert "\n" not in str(e.value)


def test_encoder_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        encoder.get_encoder(tmp_path)
    message = str(e.value)
    assert str(tmp_path) in message and "\n" not in message
    for name in ("encoder.json", "vocab.bpe", "vocab.json", "merges.txt", "meta.json"):
        assert name in message
    # Half a pair is not a tokenizer, and the message says what was there.
    shutil.copy(ENCODER_GPT2_DIR / "encoder.json", tmp_path / "encoder.json")
    with pytest.raises(FileNotFoundError, match=r"found only encoder\.json"):
        encoder.get_encoder(tmp_path)
    with pytest.raises(FileNotFoundError, match="no tokenizer in"):
        encoder.get_encoder(tmp_path / "does-not-exist")


def test_encoder_bad_bpe_files(tmp_path):
    vocab = encoder_write_tiny_vocab(tmp_path, [("a", "b")])
    (tmp_path / "vocab.bpe").write_text("#version: 0.2\na b c\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"vocab\.bpe line 2 should hold two tokens"):
        encoder.get_encoder(tmp_path)
    (tmp_path / "vocab.bpe").write_text("#version: 0.2\nab c\n", encoding="utf-8")  # "abc" has no id
    with pytest.raises(ValueError, match="do not belong together"):
        encoder.get_encoder(tmp_path)
    del vocab["Ġ"]
    (tmp_path / "encoder.json").write_text(json.dumps(vocab), encoding="utf-8")
    with pytest.raises(ValueError, match="no token for the byte 0x20"):
        encoder.get_encoder(tmp_path)
    (tmp_path / "encoder.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match=r"encoder\.json is not valid JSON"):
        encoder.get_encoder(tmp_path)
