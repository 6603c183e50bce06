"""
Tokenizers, each one fully described by a small JSON-able dict, the "spec".
The spec is saved next to a checkpoint as tokenizer.json, so a model always travels
with exactly the tokenizer it was trained with. Three kinds:

  {"token_kind": "char", "chars": [...]}     one id per character (like nanoGPT's shakespeare_char)
  {"token_kind": "gpt2"}                     GPT-2 BPE through tiktoken
  {"token_kind": "hf", "tokenizer": {...}}   a Hugging Face `tokenizers` tokenizer, its JSON embedded

load_tokenizer(spec) gives an object with encode(text), decode(ids), vocab_size, eot_id, spec, and as_hf(): the same
tokenizer as a `tokenizers.Tokenizer` (for a Hugging Face export); spec_from_hf_tokenizer(tokenizer_json) reads one
back. TOKENIZERS is the table of kinds; what differs per kind lives in its class.
"""
import functools
import json

import tiktoken
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

from core.errors import ClearError

# For hf tokenizers, the first of these that exists is taken as the end-of-text token.
HF_EOT_TOKENS = ("<|endoftext|>", "</s>", "[SEP]", "<eos>", "[EOS]")


class TokenizerError(ClearError):
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

    def as_hf(self):
        tok = Tokenizer(models.WordLevel(dict(self.stoi), unk_token="<unk>"))
        # every character on its own, newlines and spaces included ('.' would skip newlines)
        tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
        tok.decoder = decoders.Fuse()  # join the characters with nothing between them (the default puts spaces)
        # a character outside the vocabulary: "<unk>" is not in it, so WordLevel raises ("Missing [UNK] token
        # from the vocabulary") instead of encoding something else, as our encode raises TokenizerError
        return tok

    @staticmethod
    def describe(spec):
        return ["kind      : char", f"vocab     : {len(spec['chars'])} characters"]


class GPT2Tokenizer:
    VOCAB_SIZE = 50257  # known without loading tiktoken's files

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

    def as_hf(self):
        vocab, merges = _gpt2_bpe_tables(self.enc)
        eot = "<|endoftext|>"
        tok = Tokenizer(models.BPE({**vocab, eot: self.enc.eot_token}, list(merges)))
        # GPT-2's regex split, no space put in front of the text (tiktoken adds none)
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = decoders.ByteLevel()
        tok.add_special_tokens([eot])
        return tok

    @staticmethod
    def describe(spec):
        return ["kind      : gpt2", "vocab     : GPT-2 BPE (fixed ~50k tokens)"]


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

    def as_hf(self):
        tokenizer_json = dict(self.spec["tokenizer"])
        # our models are trained on plain running text, so tokens a post-processor adds to each text
        # ([CLS] ... [SEP]) would be inputs the model never saw: drop them, as our encode does
        tokenizer_json["post_processor"] = _without_added_tokens(tokenizer_json.get("post_processor"))
        return Tokenizer.from_str(json.dumps(tokenizer_json))

    @staticmethod
    def describe(spec):
        vocab = spec.get("tokenizer", {}).get("model", {}).get("vocab", {})
        return ["kind      : hf (Hugging Face tokenizers)", f"vocab     : {len(vocab)} tokens in the model, plus added tokens"]


TOKENIZERS = {"char": CharTokenizer, "gpt2": GPT2Tokenizer, "hf": HFTokenizer}

def tokenizer_class(spec):
    kind = spec.get("token_kind") if isinstance(spec, dict) else None
    if isinstance(kind, str) and kind in TOKENIZERS:
        return TOKENIZERS[kind]
    found = f"token_kind {kind!r}" if isinstance(spec, dict) else f"a {type(spec).__name__}"
    raise TokenizerError(
        f"a tokenizer spec must be a dict whose 'token_kind' is {', '.join(map(repr, TOKENIZERS))}, "
        f"but found {found}.")


def load_tokenizer(spec):
    return tokenizer_class(spec)(spec)


def spec_vocab_size(spec):
    """ how many ids a tokenizer spec produces, without loading tiktoken's files """
    return getattr(tokenizer_class(spec), "VOCAB_SIZE", None) or load_tokenizer(spec).vocab_size


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


# -----------------------------------------------------------------------------
# our specs as Hugging Face `tokenizers` tokenizers, and back

# post-processors that add tokens ([CLS] ... [SEP], <s> ... </s>, templates) to every encoded text
ADDING_POST_PROCESSORS = ("TemplateProcessing", "BertProcessing", "RobertaProcessing")


def hf_tokenizer(spec):
    """A tokenizers.Tokenizer that encodes any text to the ids load_tokenizer(spec).encode(text) gives (even with
    add_special_tokens=True) and decodes them back to the same text."""
    return load_tokenizer(spec).as_hf()  # the spec checked first, with our error messages


def spec_from_hf_tokenizer(tokenizer_json):
    """Our spec for a tokenizer.json's contents: 'char' for the char layout hf_tokenizer writes, 'gpt2' for
    GPT-2's byte-level BPE, else 'hf' with the JSON embedded."""
    model = tokenizer_json.get("model") or {}
    vocab = model.get("vocab")
    if model.get("type") == "WordLevel" and isinstance(vocab, dict) and sorted(vocab.values()) == list(range(len(vocab))):
        chars = sorted(vocab, key=vocab.get)
        if all(len(c) == 1 for c in chars):
            spec = {"token_kind": "char", "chars": chars}
            if json.loads(hf_tokenizer(spec).to_str()) == tokenizer_json:  # exactly our layout, nothing else
                return spec
    pre = tokenizer_json.get("pre_tokenizer") or {}
    if (model.get("type") == "BPE" and isinstance(vocab, dict) and len(vocab) == 50257
            and all(vocab.get(t) == i for t, i in GPT2_KNOWN_IDS.items())
            and tokenizer_json.get("normalizer") is None
            and pre.get("type") == "ByteLevel" and not pre.get("add_prefix_space")):
        return {"token_kind": "gpt2"}
    return {"token_kind": "hf", "tokenizer": tokenizer_json}


# a few GPT-2 ids (in the byte-to-unicode alphabet, 'Ġ' is a space): enough to tell GPT-2's vocabulary apart
GPT2_KNOWN_IDS = {"!": 0, "Ġt": 256, "Ġthe": 262, "ĠThe": 383, "<|endoftext|>": 50256}


def gpt2_byte_alphabet():
    """GPT-2's byte -> unicode character map: byte-level BPE works on strings, so each byte gets a visible
    character; printable bytes stand for themselves, the rest (space, control bytes) are moved past 255."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    moved = [b for b in range(256) if b not in keep]
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + n) for n, b in enumerate(moved)}}


@functools.lru_cache(maxsize=1)
def _gpt2_bpe_tables(enc):
    """(vocab, merges) of GPT-2's BPE in the byte-level alphabet, from tiktoken's ranks: about a second, so built
    once per process (an export to peft writes the tokenizer twice, beside the adapter and with its base)"""
    ranks = enc._mergeable_ranks  # bytes -> rank: tiktoken keeps no merge list, only the ranks
    alphabet = gpt2_byte_alphabet()
    text = lambda token: "".join(alphabet[b] for b in token)
    vocab = {text(token): rank for token, rank in ranks.items()}
    # the merge that made a token of rank r is the last step of BPE over its bytes with the ranks below r;
    # in rank order, the merge list ranks pairs the way tiktoken ranks their concatenations
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) > 1:
            left, right = _last_merge(token, ranks, rank)
            merges.append((text(left), text(right)))
    return vocab, tuple(merges)


def _last_merge(token, ranks, rank):
    parts = [bytes([b]) for b in token]
    while len(parts) > 2:
        pairs = [ranks.get(a + b, rank) for a, b in zip(parts, parts[1:])]
        i = min(range(len(pairs)), key=pairs.__getitem__)
        if pairs[i] >= rank:
            break
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    if len(parts) != 2:
        raise TokenizerError(f"GPT-2 token {token!r} (rank {rank}) is not one merge of two lower-ranked tokens.")
    return parts


def _without_added_tokens(post):
    """post-processor JSON with the ones that add tokens taken out (a ByteLevel one only fixes offsets: kept)."""
    if not post or post.get("type") in ADDING_POST_PROCESSORS:
        return None
    if post.get("type") == "Sequence":
        kept = [p for p in map(_without_added_tokens, post.get("processors", [])) if p]
        return {**post, "processors": kept} if kept else None
    return post


def _short(value, limit=80):
    """repr(value), cut down so an error message stays one paragraph."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."
