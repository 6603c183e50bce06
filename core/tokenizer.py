"""
Tokenizers, each one fully described by a small JSON-able dict, the "spec".
The spec is saved next to a checkpoint as tokenizer.json, so a model always travels
with exactly the tokenizer it was trained with. Three kinds:

  {"token_kind": "char", "chars": [...]}     one id per character (like nanoGPT's shakespeare_char)
  {"token_kind": "gpt2"}                     GPT-2 BPE through tiktoken
  {"token_kind": "hf", "tokenizer": {...}}   a Hugging Face `tokenizers` tokenizer, its JSON embedded

load_tokenizer(spec) gives an object with encode(text), decode(ids), vocab_size, eot_id, spec.
"""
import json

import tiktoken
from tokenizers import Tokenizer

# For hf tokenizers, the first of these that exists is taken as the end-of-text token.
HF_EOT_TOKENS = ("<|endoftext|>", "</s>", "[SEP]", "<eos>", "[EOS]")


class TokenizerError(ValueError):
    pass


class CharTokenizer:
    def __init__(self, spec):
        chars = spec.get("chars")
        if (not isinstance(chars, list) or not chars
                or not all(isinstance(c, str) and len(c) == 1 for c in chars)
                or len(set(chars)) != len(chars)):
            raise TokenizerError(
                "a char tokenizer spec needs 'chars': a non-empty list of distinct one-character "
                f"strings (the id of a character is its position in the list), but found {_short(chars)}.")
        self.spec = spec
        self.itos = chars
        self.stoi = {c: i for i, c in enumerate(chars)}
        self.vocab_size = len(chars)
        self.eot_id = None  # a char vocabulary has no end-of-text token

    def encode(self, text):
        try:
            return [self.stoi[c] for c in text]
        except KeyError as e:
            raise TokenizerError(
                f"the character {e.args[0]!r} is not in this char vocabulary of {self.vocab_size} "
                f"characters ({_short(''.join(self.itos))}); a char tokenizer can only encode the "
                "characters of the text it was built from.") from None

    def decode(self, ids):
        return "".join(self.itos[i] for i in ids)


class GPT2Tokenizer:
    def __init__(self, spec):
        try:
            self.enc = tiktoken.get_encoding("gpt2")
        except Exception as e:  # tiktoken fetches its BPE files on first use; offline that fails somewhere deep inside
            raise TokenizerError(
                "could not load tiktoken's gpt2 encoding; it downloads its BPE files on first use, so "
                "on an offline machine set TIKTOKEN_CACHE_DIR to a directory that already holds them "
                f"(found error: {type(e).__name__}: {e}).") from None
        self.spec = spec
        self.vocab_size = self.enc.n_vocab  # 50257
        self.eot_id = self.enc.eot_token  # 50256, <|endoftext|>

    def encode(self, text):
        return self.enc.encode_ordinary(text)  # ordinary: "<|endoftext|>" inside the text is just text

    def decode(self, ids):
        return self.enc.decode(list(ids))


class HFTokenizer:
    def __init__(self, spec):
        tokenizer_json = spec.get("tokenizer")
        if not isinstance(tokenizer_json, dict):
            raise TokenizerError(
                "an hf tokenizer spec needs 'tokenizer': the Hugging Face tokenizer.json contents as "
                f"a JSON object, but found {_short(tokenizer_json)}.")
        try:
            self.tok = Tokenizer.from_str(json.dumps(tokenizer_json))
        except Exception as e:
            raise TokenizerError(
                "the embedded Hugging Face tokenizer could not be loaded; expected the contents of a "
                f"tokenizer.json written by the `tokenizers` library, found error: {e}.") from None
        self.spec = spec
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
        ids = [self.tok.token_to_id(t) for t in HF_EOT_TOKENS]
        self.eot_id = next((i for i in ids if i is not None), None)

    def encode(self, text):
        # no added [CLS]/[SEP]-style tokens: we train on plain running text, like gpt2's encode_ordinary
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids):
        return self.tok.decode(list(ids), skip_special_tokens=False)


def load_tokenizer(spec):
    kind = spec.get("token_kind") if isinstance(spec, dict) else None
    if kind == "char":
        return CharTokenizer(spec)
    if kind == "gpt2":
        return GPT2Tokenizer(spec)
    if kind == "hf":
        return HFTokenizer(spec)
    found = f"token_kind {kind!r}" if isinstance(spec, dict) else f"a {type(spec).__name__}"
    raise TokenizerError(
        "a tokenizer spec must be a dict whose 'token_kind' is 'char', 'gpt2' or 'hf', "
        f"but found {found}.")


def spec_vocab_size(spec):
    """ how many ids a tokenizer spec produces, without loading tiktoken's files """
    if isinstance(spec, dict) and spec.get("token_kind") == "gpt2":
        return 50257
    return load_tokenizer(spec).vocab_size


def char_spec(text):
    """The char-level spec for a text: its distinct characters, sorted (ids follow that order)."""
    return {"token_kind": "char", "chars": sorted(set(text))}


def hf_spec_from_file(path):
    """Embed a Hugging Face tokenizer.json file in a spec (checked by loading it once)."""
    try:
        with open(path, encoding="utf-8") as f:
            tokenizer_json = json.load(f)
    except (OSError, ValueError) as e:
        raise TokenizerError(
            f"expected a Hugging Face tokenizer.json file at {path}, but it could not be read as JSON: {e}.") from None
    spec = {"token_kind": "hf", "tokenizer": tokenizer_json}
    load_tokenizer(spec)
    return spec


def _short(value, limit=80):
    """repr(value), cut down so an error message stays one paragraph."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."
