"""
core/tokenizer.py's hf_tokenizer(spec): each of our tokenizers as a Hugging Face `tokenizers.Tokenizer` that gives
the same ids and text as ours (also through transformers, which adds special tokens by default), and
spec_from_hf_tokenizer, which reads an exported tokenizer.json back as the spec it came from.
"""

import json

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from core.tokenizer import TokenizerError, char_spec, hf_tokenizer, load_tokenizer, spec_from_hf_tokenizer
from tests.helpers import GPT2_BPE, TIKTOKEN_CACHE, needs_gpt2_bpe

# English, punctuation, digits, runs of spaces, newlines, tabs, accents, emoji and Hindi
TEXT = ("Hello, world!  It's 2024: 3.14159 apples; you'll see.\n\n\tTabs\t and   spaces   \n"
        "Café naïve résumé — “quotes” (ok?) 😀🎉👍🏽 नमस्ते दुनिया, हिन्दी।\n  trailing   ")


def same_as_ours(spec, tok, text):
    """ tok (a tokenizers.Tokenizer) encodes and decodes text as load_tokenizer(spec) does, also in transformers """
    from transformers import PreTrainedTokenizerFast
    ours = load_tokenizer(spec)
    ids = ours.encode(text)
    assert tok.encode(text, add_special_tokens=False).ids == ids
    assert tok.encode(text).ids == ids  # nothing added by default either
    assert tok.decode(ids) == ours.decode(ids) == text
    fast = PreTrainedTokenizerFast(tokenizer_object=tok)
    assert fast(text)['input_ids'] == ids
    assert fast.decode(ids, clean_up_tokenization_spaces=False) == text


def exported(tok):
    return json.loads(tok.to_str())


@pytest.fixture(scope='module')
def gpt2():
    if not GPT2_BPE:
        pytest.skip(needs_gpt2_bpe.kwargs['reason'])
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv('TIKTOKEN_CACHE_DIR', str(TIKTOKEN_CACHE))
        yield hf_tokenizer({'token_kind': 'gpt2'})  # built once: ~1 s


def test_gpt2(gpt2):
    spec = {'token_kind': 'gpt2'}
    same_as_ours(spec, gpt2, TEXT)
    assert gpt2.get_vocab_size() == 50257 and gpt2.token_to_id('<|endoftext|>') == 50256
    assert spec_from_hf_tokenizer(exported(gpt2)) == spec


def test_gpt2_endoftext_inside_text(gpt2):
    # the one difference: ours encodes '<|endoftext|>' in a text as plain text (tiktoken's encode_ordinary), the
    # Hugging Face tokenizer as its special token, like every Hugging Face GPT-2 tokenizer
    ours = load_tokenizer({'token_kind': 'gpt2'})
    assert gpt2.encode('a<|endoftext|>b').ids == ours.encode('a') + [50256] + ours.encode('b')
    assert 50256 not in ours.encode('a<|endoftext|>b')
    assert gpt2.decode([50256], skip_special_tokens=False) == ours.decode([50256]) == '<|endoftext|>'


def test_char():
    spec = char_spec(TEXT)
    tok = hf_tokenizer(spec)
    same_as_ours(spec, tok, TEXT)
    same_as_ours(char_spec(' a\n b'), hf_tokenizer(char_spec(' a\n b')), ' a\n b')
    assert spec_from_hf_tokenizer(exported(tok)) == spec
    with pytest.raises(TokenizerError):
        load_tokenizer(spec).encode('Z')
    with pytest.raises(Exception, match='UNK'):  # a character outside the vocabulary fails, as ours does
        tok.encode('Z')


def test_hf_drops_the_post_processor_that_adds_tokens():
    # a small byte-level BPE trained here, with BERT's [CLS] ... [SEP] around every text
    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=['[CLS]', '[SEP]'],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    raw.train_from_iterator([TEXT, 'the cat sat on the mat.', 'the dog ate the cat food, 42 times.'], trainer)
    raw.post_processor = processors.TemplateProcessing(single='[CLS] $A [SEP]', pair='[CLS] $A [SEP] $B:1 [SEP]:1',
                                                       special_tokens=[('[CLS]', 0), ('[SEP]', 1)])
    spec = {'token_kind': 'hf', 'tokenizer': exported(raw)}
    assert raw.encode(TEXT).ids[0] == 0  # the trained tokenizer adds [CLS] ...
    tok = hf_tokenizer(spec)
    same_as_ours(spec, tok, TEXT)  # ... the exported one does not
    back = spec_from_hf_tokenizer(exported(tok))
    assert back['token_kind'] == 'hf' and load_tokenizer(back).encode(TEXT) == load_tokenizer(spec).encode(TEXT)
