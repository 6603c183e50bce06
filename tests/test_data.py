"""Tests for core/tokenizer.py and data/prepare.py: real corpora, real token counts, clear errors."""
import hashlib
import json
import os
import subprocess
import sys
import urllib.error

import numpy as np
import pytest

import data.prepare as prepare_module
from core.tokenizer import TokenizerError, char_spec, gpt2_byte_alphabet, hf_spec_from_file, load_tokenizer, spec_vocab_size
from data.prepare import DatasetError, load_meta, prepare, pydocs_text

from tests.helpers import REPO, SHARED, TIKTOKEN_CACHE, needs_gpt2_bpe

SHAKESPEARE = SHARED / "data" / "tinyshakespeare" / "input.txt"
needs_shakespeare = pytest.mark.skipif(not SHAKESPEARE.exists(), reason="shared tiny Shakespeare not present")


@pytest.fixture
def gpt2_offline(monkeypatch):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(TIKTOKEN_CACHE))


def read_split(out_dir):
    return (np.fromfile(out_dir / "train.bin", dtype=np.uint16).tolist(),
            np.fromfile(out_dir / "val.bin", dtype=np.uint16).tolist())


def no_download(url, path):
    raise AssertionError("prepare() should not download here")


# ----------------------------------------------------------------------------- datasets

def test_pydocs_char_bins_decode_back_to_the_corpus(tmp_path):
    meta = prepare("pydocs_char", out_dir=tmp_path)
    text = pydocs_text()
    assert len(text) > 400_000  # Python's help topics: ~460 KB of English
    train, val = read_split(tmp_path)
    split = int(len(text) * 0.9)
    assert (len(train), len(val)) == (split, len(text) - split) == (meta["train_tokens"], meta["val_tokens"])

    # meta.json is plain JSON and equals what prepare() returned; its tokenizer spec round-trips
    on_disk = json.loads((tmp_path / "meta.json").read_text())
    assert on_disk == meta == load_meta(tmp_path)
    assert meta["vocab_size"] == len(set(text))
    assert meta["tokenizer"] == char_spec(text)
    enc = load_tokenizer(on_disk["tokenizer"])
    assert enc.vocab_size == meta["vocab_size"] and enc.eot_id is None
    assert enc.decode(train) == text[:split]
    assert enc.decode(val) == text[split:]
    assert enc.decode(train + val) == text


def test_pydocs_corpus_is_python_help_text_and_the_same_in_every_process():
    text = pydocs_text()
    assert len(text) > 400_000 and 'The "if" statement is used for conditional execution' in text
    assert text.startswith('The "assert" statement')  # topics in sorted order: "assert" is the first name
    # fresh processes with other hash seeds (where set or hash order would show) give the very same corpus
    digest = hashlib.sha256(text.encode()).hexdigest()
    code = "import hashlib; from data.prepare import pydocs_text; print(hashlib.sha256(pydocs_text().encode()).hexdigest())"
    for seed in ("0", "12345"):
        result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60,
                                env={**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": str(REPO)})
        assert result.returncode == 0 and result.stdout.strip() == digest, result.stderr


@needs_shakespeare
def test_shakespeare_char_from_input_file(tmp_path):
    meta = prepare("shakespeare_char", input_path=SHAKESPEARE, out_dir=tmp_path)
    assert meta["vocab_size"] == 65  # the well-known tiny Shakespeare char vocabulary
    assert meta["train_tokens"] + meta["val_tokens"] == 1_115_394
    assert (meta["train_tokens"], meta["val_tokens"]) == (1_003_854, 111_540)  # nanoGPT's numbers
    assert meta["source"] == str(SHAKESPEARE)
    train, val = read_split(tmp_path)
    enc = load_tokenizer(load_meta(tmp_path)["tokenizer"])
    assert enc.decode(train[:14]) == "First Citizen:"
    assert enc.decode(train) + enc.decode(val) == SHAKESPEARE.read_text(encoding="utf-8")


@needs_shakespeare
@needs_gpt2_bpe
def test_shakespeare_gpt2_bpe(tmp_path, gpt2_offline):
    meta = prepare("shakespeare", input_path=SHAKESPEARE, out_dir=tmp_path)  # gpt2 is the default for this name
    assert meta["tokenizer"] == {"token_kind": "gpt2"}
    assert meta["vocab_size"] == 50257
    assert (meta["train_tokens"], meta["val_tokens"]) == (301_966, 36_059)  # nanoGPT's numbers
    train, val = read_split(tmp_path)
    enc = load_tokenizer(meta["tokenizer"])
    assert enc.decode(train) + enc.decode(val) == SHAKESPEARE.read_text(encoding="utf-8")


@needs_gpt2_bpe
def test_pydocs_is_gpt2_bpe_and_the_tokenizer_flag_wins(tmp_path, gpt2_offline):
    meta = prepare("pydocs", out_dir=tmp_path / "bpe") # the DATASETS row: pydocs' text, GPT-2 BPE
    assert meta["tokenizer"] == {"token_kind": "gpt2"} and meta["source"].startswith("pydoc_data.topics")
    train, val = read_split(tmp_path / "bpe")
    enc = load_tokenizer(meta["tokenizer"])
    assert enc.decode(train) + enc.decode(val) == pydocs_text()
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("hello world, hello tokens\n" * 10, encoding="utf-8")
    result = subprocess.run([sys.executable, "data/prepare.py", "--dataset", "hello", "--input", str(corpus),
                             "--out_dir", str(tmp_path / "out"), "--tokenizer", "gpt2"], cwd=REPO, capture_output=True,
                            text=True, timeout=60, env={**os.environ, "TIKTOKEN_CACHE_DIR": str(TIKTOKEN_CACHE)})
    assert result.returncode == 0, result.stderr
    assert load_meta(tmp_path / "out")["tokenizer"] == {"token_kind": "gpt2"}


def test_shakespeare_char_reuses_existing_input_txt(tmp_path, monkeypatch):
    monkeypatch.setattr(prepare_module, "download", no_download)
    (tmp_path / "input.txt").write_text("To be, or not to be: that is the question.\n")
    meta = prepare("shakespeare_char", out_dir=tmp_path)
    assert meta["vocab_size"] == len(set("To be, or not to be: that is the question.\n"))


def test_shakespeare_char_downloads_and_saves_input_txt(tmp_path, monkeypatch):
    def fake_download(url, path):
        assert url == prepare_module.SHAKESPEARE_URL
        path.write_text("First Citizen:\nBefore we proceed any further, hear me speak.\n")
    monkeypatch.setattr(prepare_module, "download", fake_download)
    meta = prepare("shakespeare_char", out_dir=tmp_path)
    assert (tmp_path / "input.txt").read_text().startswith("First Citizen:")
    assert meta["train_tokens"] + meta["val_tokens"] == len((tmp_path / "input.txt").read_text())


def test_download_failure_tells_user_to_pass_input(tmp_path, monkeypatch):
    def offline(url, path):
        raise urllib.error.URLError("Name or service not known")
    monkeypatch.setattr(prepare_module, "download", offline)
    with pytest.raises(DatasetError, match="--input FILE") as err:
        prepare("shakespeare_char", out_dir=tmp_path)
    assert "could not download" in str(err.value)
    assert not (tmp_path / "input.txt").exists()


def test_custom_dataset_name_with_input_is_char_level(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("abcabcabcabcabcabcabcabcabcabc", encoding="utf-8")  # 30 chars -> 27 train, 3 val
    meta = prepare("my_text", input_path=corpus, out_dir=tmp_path / "out")
    assert meta["tokenizer"] == {"token_kind": "char", "chars": ["a", "b", "c"]}
    assert (meta["vocab_size"], meta["train_tokens"], meta["val_tokens"]) == (3, 27, 3)
    assert read_split(tmp_path / "out") == ([0, 1, 2] * 9, [0, 1, 2])


def test_unknown_dataset_without_input_lists_known_names(tmp_path):
    with pytest.raises(DatasetError) as err:
        prepare("nope", out_dir=tmp_path)
    message = str(err.value)
    assert "'nope'" in message and "--input" in message
    for name in ("pydocs_char", "pydocs", "shakespeare_char", "shakespeare"):
        assert name in message


def test_text_too_short_to_split(tmp_path):
    corpus = tmp_path / "tiny.txt"
    corpus.write_text("h")  # one char: 0 train, 1 val
    with pytest.raises(DatasetError, match="too short"):
        prepare("tiny", input_path=corpus, out_dir=tmp_path / "out")


def test_load_meta_refuses_legacy_pickle(tmp_path):
    (tmp_path / "meta.pkl").write_bytes(b"not unpickled, ever")
    with pytest.raises(DatasetError, match="pickle") as err:
        load_meta(tmp_path)
    assert "prepare.py" in str(err.value)


def test_cli_unknown_dataset_exits_1_without_traceback():
    result = subprocess.run([sys.executable, "data/prepare.py", "--dataset", "nope"],
                            cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("error: unknown dataset 'nope'")
    assert result.stderr.count("\n") == 1  # one line


def test_cli_prepares_custom_input(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("hello world, hello tokens\n" * 10, encoding="utf-8")
    out_dir = tmp_path / "out"
    result = subprocess.run([sys.executable, "data/prepare.py", "--dataset", "hello", "--input", str(corpus),
                             "--out_dir", str(out_dir), "--val_fraction", "0.2"],
                            cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "vocab size: 14" in result.stdout
    assert (load_meta(out_dir)["train_tokens"], load_meta(out_dir)["val_tokens"]) == (208, 52)


# ----------------------------------------------------------------------------- tokenizers

@needs_gpt2_bpe
def test_gpt2_tokenizer(gpt2_offline):
    enc = load_tokenizer({"token_kind": "gpt2"})
    assert (enc.vocab_size, enc.eot_id) == (50257, 50256)
    assert enc.encode("hello world") == [31373, 995]
    text = "To be, or not to be <|endoftext|> नमस्ते"
    assert enc.decode(enc.encode(text)) == text
    assert 50256 not in enc.encode(text)  # encode_ordinary: special-token text is plain text


def train_tiny_hf_bpe(path, special_tokens):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()  # byte-level BPE decodes back to the exact text
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=special_tokens, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    sentences = ["नमस्ते दुनिया, आप कैसे हैं?", "मैं ठीक हूँ, धन्यवाद।", "भारत एक बड़ा देश है।",
                 "Hello world, how are you?", "I am fine, thank you.", "India is a big country."] * 5
    tok.train_from_iterator(sentences, trainer)
    tok.save(str(path))
    return tok


@pytest.mark.parametrize("special_tokens, eot_token", [
    (["<|endoftext|>"], "<|endoftext|>"),
    (["<pad>", "</s>", "[SEP]"], "</s>"),  # the first candidate that exists wins
    (["<pad>"], None),
])
def test_hf_tokenizer_from_file(tmp_path, special_tokens, eot_token):
    tok = train_tiny_hf_bpe(tmp_path / "tokenizer.json", special_tokens)
    spec = hf_spec_from_file(tmp_path / "tokenizer.json")
    spec = json.loads(json.dumps(spec))  # as if saved to and read back from a checkpoint's tokenizer.json
    enc = load_tokenizer(spec)
    assert enc.spec == spec
    assert enc.vocab_size == tok.get_vocab_size() <= 400
    assert enc.eot_id == (tok.token_to_id(eot_token) if eot_token else None)
    if eot_token:
        assert enc.eot_id == special_tokens.index(eot_token)  # special tokens get the first ids
    text = "नमस्ते world, भारत is big."
    ids = enc.encode(text)
    assert ids == tok.encode(text).ids and enc.decode(ids) == text


def test_hf_decode_keeps_special_tokens_and_encode_adds_none(tmp_path):
    tok = train_tiny_hf_bpe(tmp_path / "tokenizer.json", ["<pad>", "</s>"])
    trained = tok.get_vocab_size(with_added_tokens=False)
    tok.add_special_tokens(["<|user|>"]) # added after training: an id past the model's vocabulary, still an id
    tok.save(str(tmp_path / "tokenizer.json"))
    enc = load_tokenizer(hf_spec_from_file(tmp_path / "tokenizer.json"))
    ids = enc.encode("India is big.")
    assert enc.eot_id == 1 and 1 not in ids and 0 not in ids
    assert enc.decode(ids + [1] + ids) == "India is big.</s>India is big." # a sample's end-of-text stays visible
    assert enc.vocab_size == trained + 1 and enc.encode("<|user|>") == [trained]


def test_vocabulary_sizes_known_without_loading_and_the_byte_alphabet():
    assert spec_vocab_size({"token_kind": "gpt2"}) == 50257
    assert spec_vocab_size(char_spec("hello")) == 4
    alphabet = gpt2_byte_alphabet() # GPT-2's: printable bytes stand for themselves, the rest move past 255
    assert (alphabet[ord("!")], alphabet[ord("A")], alphabet[32], alphabet[10], alphabet[0]) == ("!", "A", "Ġ", "Ċ", "Ā")
    assert len(set(alphabet.values())) == 256 and alphabet[0xAD] == "Ń" and alphabet[0xFF] == "ÿ"


def test_char_tokenizer_round_trip_and_json():
    spec = char_spec("hello")
    assert spec == {"token_kind": "char", "chars": ["e", "h", "l", "o"]}
    enc = load_tokenizer(json.loads(json.dumps(spec)))
    assert enc.encode("hole") == [1, 3, 2, 0]
    assert enc.decode([1, 3, 2, 0]) == "hole"


def test_char_not_in_vocab_is_a_clear_error():
    enc = load_tokenizer(char_spec("abc"))
    with pytest.raises(TokenizerError, match="'z' is not in this char vocabulary of 3 characters"):
        enc.encode("abz")


@pytest.mark.parametrize("spec, expected", [
    ({"token_kind": "sentencepiece"}, "found token_kind 'sentencepiece'"),
    ({}, "found token_kind None"),
    (["char"], "found a list"),
    ({"token_kind": "char"}, "needs 'chars'"),
    ({"token_kind": "char", "chars": ["a", "a"]}, "distinct"),
    ({"token_kind": "char", "chars": ["ab"]}, "one-character"),
    ({"token_kind": "hf"}, "needs 'tokenizer'"),
    ({"token_kind": "hf", "tokenizer": {"model": "nonsense"}}, "could not be loaded"),
])
def test_malformed_specs_raise_tokenizer_error(spec, expected):
    with pytest.raises(TokenizerError, match=expected):
        load_tokenizer(spec)


def test_hf_spec_from_missing_file(tmp_path):
    with pytest.raises(TokenizerError, match="tokenizer.json file"):
        hf_spec_from_file(tmp_path / "missing.json")
