"""
train.py's checks of its settings, called as the function train.py calls once (core/train_checks.py): every row of
its tables, each range, and the resume's vocabulary check and notes. A few cases also run train.py itself
(tests/test_bad_input.py), for the paragraph and the exit code the user sees.
"""

import math

import pytest

from configurator import ConfigError
from core.checkpoint import CheckpointError
from core.cli import SetupError
from core.train_checks import (AT_LEAST_ONE, AT_LEAST_ZERO, CHOICES, ERRORS, FRACTIONS, NOTES, POSITIVE,
                               check_train_config, check_vocabulary, nothing_saved_note, resume_notes)
from tests.helpers import train_defaults

# train.py's defaults as it writes them, on this machine's CPU (its device and dtype are expressions)
VALID = {**train_defaults(), 'device': 'cpu', 'dtype': 'float32'}


def check(**changes):
    return check_train_config({**VALID, **changes})


def test_valid_settings_pass_without_notes():
    assert check() == []


@pytest.mark.parametrize('key', AT_LEAST_ONE + AT_LEAST_ZERO + FRACTIONS + POSITIVE)
def test_each_range_refuses_its_first_wrong_value_and_nan(key):
    lowest = {**dict.fromkeys(AT_LEAST_ONE, 1), **dict.fromkeys(AT_LEAST_ZERO + FRACTIONS, 0)}.get(key)
    if lowest is not None:
        check(**{'n_head': 1, key: lowest}) # the bound itself is allowed (one head divides any width)
    wrong = {**dict.fromkeys(AT_LEAST_ONE, 0), **dict.fromkeys(AT_LEAST_ZERO, -1), **dict.fromkeys(FRACTIONS, 1.0),
             **dict.fromkeys(POSITIVE, 0.0)}[key]
    for value in (wrong, math.nan) if isinstance(VALID[key], float) else (wrong,):
        with pytest.raises(ConfigError, match=rf'^{key} = {value!r} cannot be used: it must be '):
            check(**{key: value})


@pytest.mark.parametrize('key', sorted(CHOICES))
def test_each_choice_takes_its_values_only(key):
    for value in CHOICES[key]:
        check(**{key: value})
    with pytest.raises(ConfigError, match=f"{key} = 'float8' cannot be used: it must be one of {', '.join(CHOICES[key])}"):
        check(**{key: 'float8'})


# one case per row of ERRORS, in its order: (changes, text of the message)
ERROR_CASES = [
    (dict(n_head=3), 'n_embd = 128 is not divisible by n_head = 3'),
    (dict(dataset='../x'), "dataset = '../x' is not a dataset name"),
    (dict(model_name='../evil'), "model_name = '../evil' is not a name"),
    (dict(init_from='a', resume_from='c'), "init_from = 'a' and resume_from = 'c' name two checkpoints"),
    (dict(adapter_from='p', resume_from='c'), 'pass one of them (the base model of the adapter goes in init_from)'),
    (dict(fsdp=True), 'this run is one process: run it as torchrun'),
    (dict(fsdp=True, dtype='float16'), "dtype = 'float16' cannot be used with fsdp = True"),
    (dict(out_dir='notes.txt'), "out_dir = 'notes.txt' is a file"),
]


def test_every_error_rule_has_a_case():
    assert len(ERROR_CASES) == len(ERRORS)


@pytest.mark.parametrize('changes, message', ERROR_CASES, ids=[m for _, m in ERROR_CASES])
def test_each_error_rule_names_the_setting(changes, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / 'notes.txt').write_text('not a directory')
    if changes.get('fsdp') and changes.get('dtype'):
        monkeypatch.setenv('RANK', '0') # under torchrun: the rank check passes, the dtype one speaks
    else:
        monkeypatch.delenv('RANK', raising=False)
    with pytest.raises(ConfigError) as caught:
        check(**changes)
    assert message in str(caught.value)
    check(**{k: VALID[k] for k in changes}) # the same keys at valid values pass


def test_the_same_checkpoint_named_twice_is_one_checkpoint(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert check(init_from='run', resume_from='./run') == []


def test_out_dir_is_checked_where_model_name_puts_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / 'checkpoints').mkdir()
    (tmp_path / 'checkpoints' / 'dante').write_text('a file')
    with pytest.raises(ConfigError, match="out_dir = 'checkpoints/dante' is a file"):
        check(model_name='dante')


def test_a_device_this_machine_lacks_is_a_setup_error():
    with pytest.raises(SetupError, match="device = 'gpu' is not a torch device"):
        check(device='gpu')


# one case per row of NOTES: (changes, text of the note)
NOTE_CASES = [
    (dict(embedding_mode='lora', embedding_rank=0), "embedding_mode = 'lora' with embedding_rank = 0"),
    (dict(embedding_mode='standard', embedding_rank=4), 'embedding_rank = 4 is not used'),
    (dict(model_name='dante', out_dir='elsewhere'), "out_dir = 'elsewhere' is not used: with model_name"),
]


def test_every_note_rule_has_a_case():
    assert len(NOTE_CASES) == len(NOTES)


@pytest.mark.parametrize('changes, note', NOTE_CASES, ids=[n for _, n in NOTE_CASES])
def test_each_note_is_said_once_and_only_when_it_holds(changes, note, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    notes = check(**changes)
    assert len(notes) == 1 and note in notes[0], notes


# -----------------------------------------------------------------------------
# a resume

class Stored:
    """ what resume_notes and check_vocabulary read of a checkpoint """
    def __init__(self, tokenizer, vocab_size=96, block_size=64, adapters=None, **config):
        self.path, self.tokenizer = 'ckpt', tokenizer
        self.config = type('Config', (), dict(VALID, vocab_size=vocab_size, block_size=block_size, bias=False,
                                              activation='gelu', **config))
        self.adapters = adapters or {}

    def trained_adapters(self):
        return self.adapters


CHARS = {'token_kind': 'char', 'chars': list('abc')}
META = {'tokenizer': CHARS, 'vocab_size': 3}


def test_a_checkpoint_of_another_vocabulary_is_refused():
    check_vocabulary(Stored(CHARS), META, 'data/x')
    with pytest.raises(CheckpointError, match='ckpt was trained with another tokenizer than data/x/meta.json'):
        check_vocabulary(Stored({'token_kind': 'gpt2'}), META, 'data/x')
    with pytest.raises(CheckpointError, match="meta.json's has 100 tokens where the model has 96 embedding rows"):
        check_vocabulary(Stored(None), {**META, 'vocab_size': 100}, 'data/x')
    check_vocabulary(Stored(None), {**META, 'vocab_size': 96}, 'data/x') # it fits the embedding: used


def test_resume_notes_say_what_the_checkpoint_decides():
    config = {**VALID, 'block_size': 128, 'n_layer': 4}
    notes = resume_notes(Stored(CHARS, block_size=64, n_layer=2), config, {'n_layer'}, VALID, META, 'data/x')
    assert notes == ['n_layer = 2 from the checkpoint is used (this config says 4)',
                     "block_size = 64 from the checkpoint is used: it has position embeddings for 64 positions only, "
                     "so this config's 128 cannot be honoured; batches, evaluation and generation use 64"]
    # a setting this run does not give is taken without a word; a shorter block size crops
    notes = resume_notes(Stored(CHARS, block_size=256, n_layer=2), config, set(), VALID, META, 'data/x')
    assert len(notes) == 1 and notes[0].startswith("block_size = 128 from this config: the checkpoint's 256"), notes
    notes = resume_notes(Stored(None, block_size=128, adapters={'attn_lora_rank': 8}), config, set(), VALID, META, 'x')
    assert len(notes) == 2 and 'trained with LoRA' in notes[0] and '--attn_lora_rank=8' in notes[0], notes
    assert 'stores no vocabulary' in notes[1]
    # the run that sets its own adapters hears nothing of the trained ones
    assert resume_notes(Stored(CHARS, block_size=128, adapters={'attn_lora_rank': 8}), {**config, 'attn_lora_rank': 4},
                        {'attn_lora_rank'}, VALID, META, 'x') == []


def test_a_run_that_saved_nothing_says_why():
    config = {**VALID, 'out_dir': 'out', 'max_iters': 0}
    assert nothing_saved_note(config, True, 5, 5, False, '', 1.0) is None
    assert nothing_saved_note(config, False, 0, 0, True, 'out', 1.0) is None # an in-place resume: said before the loop
    assert 'eval_only = True: nothing was saved' in nothing_saved_note({**config, 'eval_only': True}, False, 0, 3,
                                                                        False, '', 1.0)
    assert nothing_saved_note(config, False, 0, 0, False, 'ckpt.pt', 1.0) == (
        'nothing was saved to out: no step was trained (max_iters = 0); python convert_checkpoints.py ckpt.pt --to '
        'bundle DIR writes it as a bundle')
    assert 'never went below best_val_loss 0.5000' in nothing_saved_note(config, False, 4, 4, False, '', 0.5)
