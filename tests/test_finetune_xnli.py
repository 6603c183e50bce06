"""
Tests for finetune_hindi_xnli.py: the data readers and their errors, the pair encoding, pooling at real lengths,
the two-group learning-rate schedule, the metrics, the bundles, and end-to-end runs of the script on synthetic
Hindi XNLI data with random modded-nanogpt checkpoints (small and medium layouts), including --resume.
"""

import argparse
import json
import re
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch

import core.classifier
import finetune_hindi_xnli as ft
from core.finetune_data import label_names, parse_label
from core.tokenizer import hf_spec_from_file, load_tokenizer
from load_checkpoint_helper import make_random_checkpoint
from model import GPTBatched
from tests.helpers import interrupted_after_first_save, run_script
from data.synthetic_xnli import (LABELS, XNLI_COLUMNS, make_examples, make_xnli_data, round_up, sentence,
                                train_tokenizer)

SCRIPT = 'finetune_hindi_xnli.py'
TINY = dict(num_layers=8, num_heads=2, model_dim=64, head_dim=32)  # layer 7 has no attention, as in every layout


@pytest.fixture(scope='module')
def xnli(tmp_path_factory):
    """ synthetic XNLI release files, their BPE tokenizer and a small-layout random checkpoint """
    root = tmp_path_factory.mktemp('xnli')
    data_dir, tokenizer = make_xnli_data(root)
    tok = load_tokenizer(hf_spec_from_file(tokenizer))
    vocab = round_up(tok.vocab_size)  # the training scripts pad the vocabulary to a multiple of 128
    ckpt = make_random_checkpoint(root / 'small.pt', layout='small', vocab_size=vocab, **TINY)
    return argparse.Namespace(root=root, data_dir=data_dir, tokenizer=tokenizer, tok=tok, vocab=vocab, ckpt=ckpt)


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    # the scripts run as subprocesses: with tiny models one thread is as fast, and two processes with two
    # threads each on a busy 2-core machine slow down ~10x (measured 11 s -> 92 s for one run)
    monkeypatch.setenv('OMP_NUM_THREADS', '1')


def write_tsv(path, rows):
    """ rows of (language, gold_label, sentence1, sentence2) as an XNLI release TSV """
    lines = ['\t'.join(XNLI_COLUMNS)]
    for lang, gold, s1, s2 in rows:
        record = dict(language=lang, gold_label=gold, sentence1=s1, sentence2=s2)
        lines.append('\t'.join(str(record.get(c, 'x')) for c in XNLI_COLUMNS))
    path.write_text('\n'.join(lines) + '\n', encoding='utf-8')
    return path


def args_for(**kw):
    return ft.get_args(['--pretrained_ckpt_path', 'x.pt', '--tokenizer_name', 't.json'] +
                       [a for k, v in kw.items() for a in (f'--{k}', str(v))])


def losses(output):
    return [float(m) for m in re.findall(r'^step \d+/\d+ \(epoch \d+\): train loss ([\d.]+)', output, re.M)]


# ----------------------------------------------------------------------------- reading data

def test_tsv_reader_keeps_the_language_and_maps_gold_labels(tmp_path):
    path = write_tsv(tmp_path / 'xnli.dev.tsv', [
        ('en', 'neutral', 'He said "yes', 'A quote that never closes'),  # XNLI has these: read without quoting
        ('hi', 'entailment', 'राम खाना खाता है।', 'राम खाना खाता है।'),
        ('hi', 'contradiction', 'सीता स्कूल जाती है।', 'सीता स्कूल नहीं जाती है।'),
        ('fr', 'entailment', 'Il mange.', 'Il mange.'),
        ('hi', 'neutral', 'बच्चे किताब पढ़ते हैं।', 'किसान चाय बनाते हैं।'),
    ])
    assert ft.read_examples(str(path), 'hi').rows == [
        ('राम खाना खाता है।', 'राम खाना खाता है।', 0),
        ('सीता स्कूल जाती है।', 'सीता स्कूल नहीं जाती है।', 2),
        ('बच्चे किताब पढ़ते हैं।', 'किसान चाय बनाते हैं।', 1)]
    assert ft.read_examples(str(path), 'en').rows == [('He said "yes', 'A quote that never closes', 1)]
    with pytest.raises(ft.DataError, match=r"no examples for language 'ur'.*languages found: en, fr, hi"):
        ft.read_examples(str(path), 'ur')


def test_jsonl_json_and_csv_readers_with_custom_columns(tmp_path):
    rows = [{'premise-phoneme': 'ram kʰaːnaː', 'hypothesis-phoneme': 'ram', 'label': 0},
            {'premise-phoneme': 'siːtaː', 'hypothesis-phoneme': 'nəhĩː', 'label': 'contradiction'},
            {'premise-phoneme': 'bətʃtʃe', 'hypothesis-phoneme': 'kɪsaːn', 'label': '1'}]
    jsonl = tmp_path / 'train.jsonl'
    jsonl.write_text(''.join(json.dumps(r, ensure_ascii=False) + '\n' for r in rows), encoding='utf-8')
    as_list = tmp_path / 'train.json'
    as_list.write_text(json.dumps(rows, ensure_ascii=False), encoding='utf-8')
    csv_path = tmp_path / 'train.csv'
    csv_path.write_text('premise-phoneme,hypothesis-phoneme,label\n' + ''.join(
        f'"{r["premise-phoneme"]}","{r["hypothesis-phoneme"]}",{r["label"]}\n' for r in rows), encoding='utf-8')
    want = [('ram kʰaːnaː', 'ram', 0), ('siːtaː', 'nəhĩː', 2), ('bətʃtʃe', 'kɪsaːn', 1)]
    for path in (jsonl, as_list, csv_path):
        assert ft.read_examples(str(path), 'hi', ['premise-phoneme', 'hypothesis-phoneme']).rows == want, path

    # the default column names of a Hugging Face datasets export
    default = tmp_path / 'valid.jsonl'
    default.write_text(json.dumps({'premise': 'a', 'hypothesis': 'b', 'label': 2}) + '\n')
    assert ft.read_examples(str(default)).rows == [('a', 'b', 2)]


def test_every_accepted_label_form_maps_to_its_class():
    forms = [('entailment', 0), ('Neutral ', 1), ('CONTRADICTION', 2), (2, 2), ('1', 1), (' 0 ', 0), (1.0, 1),
             (True, 1), ('false', 0), (False, 0), ('-1', -1), ('maybe', None), (2.5, None)]
    assert [(value, parse_label(value, LABELS)) for value, _ in forms] == forms
    assert parse_label('b', ['a', 'b', 'c']) == 1 # a ClassLabel's own names
    # the names of the classes: XNLI's for label words or three classes, else the ids, at least two
    assert label_names(None, None, ['neutral', 'entailment']) == list(LABELS)
    assert label_names(None, None, [0, 4, '2']) == ['0', '1', '2', '3', '4']
    assert label_names(None, None, [0, 0]) == ['0', '1'] and label_names(None, None, [True, False]) == ['0', '1']
    assert label_names(None, 3, [0, 1]) == list(LABELS) and label_names(None, 4, [0]) == ['0', '1', '2', '3']
    assert label_names(['neg', 'pos'], None, [0, 1]) == ['neg', 'pos']


def test_unknown_label_names_the_row_and_value(tmp_path):
    path = write_tsv(tmp_path / 'xnli.dev.tsv', [('hi', 'entailment', 'a', 'b'), ('hi', 'maybe', 'c', 'd')])
    with pytest.raises(ft.DataError) as e:
        ft.read_examples(str(path), 'hi')
    assert str(path) in str(e.value) and 'line 3' in str(e.value) and "'maybe'" in str(e.value)
    jsonl = tmp_path / 'x.jsonl'
    jsonl.write_text(''.join(json.dumps({'premise': 'a', 'hypothesis': 'b', 'label': y}) + '\n' for y in (1, 7)))
    with pytest.raises(ft.DataError, match=r"x\.jsonl line 2: unknown label 7 in column 'label'"):
        ft.read_examples(str(jsonl), num_classes=3)


def test_missing_column_lists_the_columns_found(tmp_path):
    path = tmp_path / 'train.csv'
    path.write_text('sentence_a,sentence_b,label\nx,y,0\n')
    with pytest.raises(ft.DataError) as e:
        ft.read_examples(str(path))
    message = str(e.value)
    assert "no column 'premise', 'hypothesis'" in message and '--text_column' in message
    assert "found columns: 'sentence_a', 'sentence_b', 'label'" in message


def test_missing_file_and_unknown_type_are_clear(tmp_path):
    with pytest.raises(ft.DataError, match=r'nope\.tsv does not exist; expected a \.tsv file.*--data_dir'):
        ft.read_examples(str(tmp_path / 'nope.tsv'))
    (tmp_path / 'data.xlsx').write_bytes(b'PK')
    with pytest.raises(ft.DataError, match=r"unknown file type '\.xlsx'; expected \.tsv"):
        ft.read_examples(str(tmp_path / 'data.xlsx'))


def test_splits_hold_out_a_seeded_tenth_of_xnli_dev(xnli):
    train, valid, test, sources = ft.load_splits(args_for(data_dir=xnli.data_dir))
    train = train.rows
    assert (len(train), len(valid), len(test)) == (1080, 120, 300)  # 1200 Hindi dev rows; other languages dropped
    assert sources['test'].endswith('xnli.test.tsv') and 'xnli.dev.tsv (seed 1337)' in sources['valid']
    again = ft.load_splits(args_for(data_dir=xnli.data_dir))
    assert (again[0].rows, again[1]) == (train, valid)  # the same split on every run with the same seed
    other = ft.load_splits(args_for(data_dir=xnli.data_dir, seed=7))
    assert other[1] != valid and sorted(other[0].rows + other[1]) == sorted(train + valid)


# ----------------------------------------------------------------------------- encoding, batching, pooling

def test_pair_encoding_joins_with_the_tokenizers_eot_id_and_truncates_the_premise_first(xnli):
    tok = xnli.tok
    sep = ft.separator(tok)
    assert tok.eot_id == tok.tok.token_to_id('<|endoftext|>') and sep == [tok.eot_id]
    premise, hypothesis = sentence(0, 0), sentence(1, 2, negated=True)
    p, h = tok.encode(premise), tok.encode(hypothesis)
    ids = ft.encode_texts(tok, (premise, hypothesis), sep, block_size=256)
    assert ids == p + [tok.eot_id] + h and ids.count(tok.eot_id) == 1
    assert tok.eot_id not in p + h  # the users' ' <ENDOFTEXT> ' text would have been ordinary pieces here

    # too long: the premise is cut, the hypothesis kept whole
    block = len(h) + 4
    ids = ft.encode_texts(tok, (premise, hypothesis), sep, block_size=block)
    assert len(ids) == block and ids == p[:3] + [tok.eot_id] + h
    # only a hypothesis longer than the block itself is cut
    assert ft.encode_texts(tok, (premise, hypothesis), sep, block_size=5) == [tok.eot_id] + h[:4]


def test_without_an_eot_token_the_separator_is_a_newline(tmp_path):
    path = train_tokenizer([sentence(0, 0), 'line one\nline two'], tmp_path / 'plain.json', vocab_size=300)
    spec = hf_spec_from_file(path)
    # remove the special token: this tokenizer has no end-of-text token at all
    spec['tokenizer']['added_tokens'] = []
    del spec['tokenizer']['model']['vocab']['<|endoftext|>']
    tok = load_tokenizer(spec)
    assert tok.eot_id is None
    assert ft.separator(tok) == tok.encode('\n') != []


def test_token_ids_beyond_the_checkpoint_vocabulary_are_a_clear_error(xnli):
    examples = make_examples(6, seed=3)
    data = ft.encode_dataset(examples, xnli.tok, ft.separator(xnli.tok), 64, xnli.vocab, 'train')
    assert len(data) == 6
    with pytest.raises(ft.TokenizerError, match=r'only 100 embedding rows: this tokenizer \(\d+ tokens\) does not'):
        ft.encode_dataset(examples, xnli.tok, ft.separator(xnli.tok), 64, 100, 'train')


def test_collate_pads_right_and_keeps_real_lengths():
    x, lengths, y = ft.collate([([5, 0, 7], 2), ([9], 0), ([0, 3, 0, 4], 1)])
    assert x.tolist() == [[5, 0, 7, 0], [9, 0, 0, 0], [0, 3, 0, 4]]
    assert lengths.tolist() == [3, 1, 4] and y.tolist() == [2, 0, 1]


def test_pooling_takes_the_real_last_token_not_the_last_non_zero_id():
    # id 0 is a real token (here <|endoftext|>, the separator) and also the padding
    x, lengths, _ = ft.collate([([5, 6, 0], 0), ([7, 0, 8, 9, 0], 1), ([3], 2)])
    hidden = torch.arange(3 * 5 * 2, dtype=torch.float32).view(3, 5, 2)  # distinct features per position
    pooled = ft.pool_last(hidden, lengths)
    assert torch.equal(pooled, torch.stack([hidden[0, 2], hidden[1, 4], hidden[2, 0]]))
    last_non_zero = torch.stack([hidden[i, (row != 0).nonzero().max()] for i, row in enumerate(x)])
    assert not torch.equal(pooled[:2], last_non_zero[:2])  # the users' rule pools the wrong token


def test_padding_does_not_change_the_classifiers_output():
    torch.manual_seed(0)
    model = ft.NLIClassifier(GPTBatched(128, max_seq_len=64, arch='small', **TINY), dropout=0.0).eval()
    seqs = [[5, 0, 7, 0], [9, 3, 0, 2, 0, 0, 11, 4, 1], [2]]
    x, lengths, _ = ft.collate([(s, 0) for s in seqs])
    with torch.no_grad():
        batched = model(x, lengths)
        alone = torch.cat([model(torch.tensor([s]), torch.tensor([len(s)])) for s in seqs])
    torch.testing.assert_close(batched, alone, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- optimizer and schedule

def test_the_schedule_keeps_each_groups_own_learning_rate_and_their_ratio():
    model = ft.NLIClassifier(GPTBatched(128, max_seq_len=32, arch='small', **TINY))
    args = args_for(learning_rate=3e-5, head_learning_rate=1e-3, weight_decay=0.1)
    opt = ft.make_optimizer(model, args)
    names = {g['name'] for g in opt.param_groups}
    assert names == {'pretrained', 'head'}
    n_backbone = sum(p.numel() for g in opt.param_groups if g['name'] == 'pretrained' for p in g['params'])
    assert n_backbone == sum(p.numel() for p in model.backbone.parameters())
    for g in opt.param_groups:  # the modded scalars (1-D) and the head's bias do not decay
        assert g['weight_decay'] == (0.1 if all(p.dim() >= 2 for p in g['params']) else 0.0)

    total, warmup, factors = 100, 10, []
    for step in (0, 5, 9, 10, 30, 60, 99):
        factors.append(ft.lr_factor(step, total, warmup))
        ft.scale_lrs(opt, factors[-1])
        lrs = {g['name']: g['lr'] for g in opt.param_groups}
        assert lrs['pretrained'] == pytest.approx(3e-5 * factors[-1])
        assert lrs['head'] == pytest.approx(1e-3 * factors[-1])
        assert lrs['head'] / lrs['pretrained'] == pytest.approx(1e-3 / 3e-5)
    assert factors[:4] == pytest.approx([0.1, 0.6, 1.0, 1.0])  # linear warmup to the peak
    assert factors[3:] == sorted(factors[3:], reverse=True) and factors[-1] == pytest.approx(0.1, abs=1e-3)


# ----------------------------------------------------------------------------- metrics

def test_metrics_on_a_hand_made_example():
    gold = [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]
    pred = [0, 0, 0, 1, 1, 1, 0, 2, 2, 1]
    m = ft.metrics(gold, pred)
    assert m['confusion_matrix'] == [[3, 1, 0], [1, 2, 0], [0, 1, 2]]
    assert m['accuracy'] == pytest.approx(0.7) and m['num_examples'] == 10
    assert m['per_class'] == pytest.approx({'entailment': 0.75, 'neutral': 2 / 3, 'contradiction': 2 / 3})
    # F1: entailment P 3/4 R 3/4 -> 0.75; neutral P 2/4 R 2/3 -> 4/7; contradiction P 1 R 2/3 -> 0.8
    assert m['per_class_f1'] == pytest.approx({'entailment': 0.75, 'neutral': 4 / 7, 'contradiction': 0.8})
    assert m['macro_f1'] == pytest.approx((0.75 + 4 / 7 + 0.8) / 3)

    # the fork's macro averages: recall 0.694, F1 0.707, F2 0.696; micro F1 would be the accuracy 0.7, weighted F1 0.711
    assert m['recall'] == pytest.approx((0.75 + 2 / 3 + 2 / 3) / 3)
    assert m['f1_score'] == pytest.approx((0.75 + 4 / 7 + 0.8) / 3)
    f2 = lambda p, r: 5 * p * r / (4 * p + r)
    assert m['f2_score'] == pytest.approx((f2(3 / 4, 3 / 4) + f2(2 / 4, 2 / 3) + f2(1, 2 / 3)) / 3)

    m = ft.metrics([0, 0, 2], [0, 0, 0])  # no neutral examples, contradiction never predicted
    assert m['per_class'] == {'entailment': 1.0, 'neutral': None, 'contradiction': 0.0}
    assert m['macro_f1'] == pytest.approx((0.8 + 0 + 0) / 3) # every class
    assert m['f1_score'] == pytest.approx((0.8 + 0) / 2) # the fork's: the classes that occur
    assert m['recall'] == pytest.approx((1 + 0) / 2) and m['f2_score'] == pytest.approx((f2(2 / 3, 1) + 0) / 2)
    assert m['accuracy'] == pytest.approx(2 / 3) and m['confusion_matrix'] == [[2, 0, 0], [0, 0, 0], [1, 0, 0]]


def test_the_loss_of_an_evaluation_is_the_mean_over_examples_not_over_batches():
    torch.manual_seed(0)
    model = ft.NLIClassifier(GPTBatched(128, max_seq_len=32, arch='small', **TINY)).eval()
    data = [([5, 6, 7], 0), ([8, 9], 2), ([10], 1), ([11, 12, 13, 14], 0), ([15, 16], 0)]
    with torch.no_grad():
        logits = torch.cat([model(*ft.collate([ex])[:2]) for ex in data])
    expected = torch.nn.functional.cross_entropy(logits, torch.tensor([y for _, y in data])).item()
    m = ft.evaluate(model, data, 2, 'cpu', nullcontext(), keep_outputs=True) # batches of 2, 2 and 1
    assert m['loss'] == pytest.approx(expected, rel=1e-5) and m['labels'] == [0, 2, 1, 0, 0]
    assert m['predictions'] == logits.argmax(-1).tolist() and m['num_examples'] == 5
    assert torch.tensor(m['logits']) == pytest.approx(logits, abs=1e-5)


def test_class_weights_are_inverse_class_frequencies():
    weights = ft.class_weights([0] * 6 + [1] * 3 + [2], 3) # scikit-learn's 'balanced': n / (classes x count)
    assert weights.tolist() == pytest.approx([10 / 18, 10 / 9, 10 / 3])
    assert ft.class_weights([0, 0, 1], 3).tolist() == pytest.approx([0.5, 1.0, 1.0]) # an absent class counts 1


def test_the_best_model_is_the_most_accurate_and_at_equal_accuracy_the_lower_loss():
    first, lower_loss, more_accurate = dict(accuracy=0.6, loss=1.0), dict(accuracy=0.6, loss=0.9), dict(accuracy=0.7, loss=1.3)
    assert ft.is_better(first, None)
    assert ft.is_better(more_accurate, lower_loss) and not ft.is_better(lower_loss, more_accurate) # accuracy first
    assert ft.is_better(lower_loss, first) and not ft.is_better(first, lower_loss)
    assert not ft.is_better(dict(first), first) # a tie keeps the earlier best


def test_steps_per_epoch_and_the_warmup_follow_the_batch_accumulation_and_ratio():
    args = args_for(batch_size=4, gradient_accumulation_steps=2, num_epochs=3, warmup_ratio=0.1)
    assert ft.step_counts(args, 103) == (13, 39) # ceil(103 / 8) steps an epoch
    assert ft.step_counts(args_for(batch_size=4, num_epochs=3, max_steps=20), 103) == (26, 20)
    schedule = ft.lr_schedule(args_for(warmup_ratio=0.1), 40) # 4 warmup steps, then cosine to 10% at step 40
    assert [schedule(s) for s in (0, 1, 2, 3, 4, 22, 40)] == pytest.approx([0.25, 0.5, 0.75, 1, 1, 0.55, 0.1])
    flat = ft.lr_schedule(ft.get_args(['--pretrained_ckpt_path', 'x.pt', '--no_decay_lr']), 40)
    assert {flat(s) for s in (0, 3, 22, 40)} == {1.0}


# ----------------------------------------------------------------------------- bundles

def test_a_failed_save_keeps_the_old_bundle_whole(tmp_path, monkeypatch):
    model = ft.NLIClassifier(GPTBatched(128, max_seq_len=32, arch='small', **TINY))
    info = dict(vocab_size=128, format='small', step=0, val_loss=None, **TINY)
    spec, config = {'token_kind': 'gpt2'}, ft.bundle_config(info, 'small', args_for(block_size=32))
    best = tmp_path / 'best'
    ft.save_classifier(best, model, config, spec, {'step': 10})
    before = {p.name: p.read_bytes() for p in best.iterdir()}
    assert set(before) == {'model.pt', 'config.json', 'tokenizer.json', 'training_state.json', 'manifest.json'}

    def crash(*a, **k):
        raise OSError('disk full')
    monkeypatch.setattr(core.classifier, 'write_json', crash) # the classifier's writer
    with pytest.raises(OSError, match='disk full'):
        ft.save_classifier(best, model, config, spec, {'step': 20})
    assert {p.name: p.read_bytes() for p in best.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ['best']  # no half-written sibling left behind

    reloaded, _, _ = ft.load_classifier(str(best))
    for k, v in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[k], v), k

    # a damaged model.pt is named by its checksum, not unpickled
    data = bytearray((best / 'model.pt').read_bytes())
    data[len(data) // 2] ^= 1
    (best / 'model.pt').write_bytes(bytes(data))
    with pytest.raises(ft.CheckpointError, match=r'model\.pt does not match its checksum'):
        ft.load_classifier(str(best))


# ----------------------------------------------------------------------------- the script, end to end

def test_end_to_end_train_evaluate_and_resume(xnli, tmp_path):
    common = ['--dataset', 'hindi_xnli', '--data_dir', xnli.data_dir, '--pretrained_ckpt_path', xnli.ckpt,
              '--tokenizer_name', xnli.tokenizer, '--n_layer', 8, '--n_head', 2, '--n_embd', 64, '--batch_size', 32,
              '--device', 'cpu', '--learning_rate', 2e-3, '--head_learning_rate', 3e-3, '--out_dir', 'out']
    _, out = run_script(SCRIPT, *common, '--num_epochs', 2, cwd=tmp_path)
    # 1080 training examples / 32 = 34 steps per epoch; one evaluation of all 120 validation examples per epoch
    assert 'train 1080' in out and 'valid 120' in out and 'test 300' in out and 'separator ids [0]' in out
    assert len(re.findall(r'^eval step (34|68) ', out, re.M)) == 2
    first = losses(out)
    assert first[0] > 1.0 and first[-1] < 0.7 * first[0], first  # chance is ln 3 = 1.10

    results = json.loads((tmp_path / 'out' / 'results.json').read_text())
    assert results['split'] == 'test' and results['num_examples'] == 300
    assert results['accuracy'] >= 0.6 and results['macro_f1'] >= 0.55, results  # chance: 1/3
    cm = results['confusion_matrix']
    assert len(cm) == 3 and all(len(row) == 3 for row in cm) and sum(map(sum, cm)) == 300
    assert [sum(row) for row in cm] == [100, 100, 100]  # the gold classes are balanced
    assert set(results['per_class']) == set(LABELS)
    assert results['best_validation']['accuracy'] >= 0.6 and results['best_validation']['num_examples'] == 120

    best, last = tmp_path / 'out' / 'best', tmp_path / 'out' / 'last'
    assert {p.name for p in best.iterdir()} == {'model.pt', 'config.json', 'tokenizer.json', 'training_state.json',
                                                'manifest.json'}
    assert {p.name for p in last.iterdir()} == {p.name for p in best.iterdir()} | {'optimizer.pt'}
    weights = torch.load(best / 'model.pt', weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in weights.values()) and weights['head.weight'].shape == (3, 64)
    torch.load(last / 'optimizer.pt', weights_only=True)
    config = json.loads((best / 'config.json').read_text())
    assert {k: config[k] for k in ('vocab_size', 'num_layers', 'num_heads', 'model_dim', 'head_dim', 'arch',
                                   'num_classes', 'labels')} == {
        'vocab_size': xnli.vocab, 'num_layers': 8, 'num_heads': 2, 'model_dim': 64, 'head_dim': 32, 'arch': 'small',
        'num_classes': 3, 'labels': list(LABELS)}
    assert json.loads((best / 'tokenizer.json').read_text()) == hf_spec_from_file(xnli.tokenizer)
    model, _, _ = ft.load_classifier(str(best))  # rebuilt from config.json alone; same test accuracy
    test = ft.encode_dataset(ft.read_examples(str(xnli.data_dir / 'xnli.test.tsv'), 'hi').rows, xnli.tok, [xnli.tok.eot_id],
                             256, xnli.vocab, 'test')
    assert ft.evaluate(model, test, 64, 'cpu', nullcontext())['accuracy'] == pytest.approx(results['accuracy'])
    state = json.loads((last / 'training_state.json').read_text())
    best_before = json.loads((best / 'training_state.json').read_text())['best']
    assert state['step'] == 68 and state['best'] == best_before and 'rng' in state
    # best/ is the evaluation of highest accuracy (then lowest loss), and results.json scores it on the test set
    chosen = max(state['history'], key=lambda h: (h['accuracy'], -h['loss']))
    assert best_before['step'] == chosen['step'] == results['best_step'] and best_before['loss'] == chosen['loss']

    # --resume continues the run in out/last: another pretrained checkpoint named with it is refused, not ignored
    other = tmp_path / 'other.pt'
    other.write_bytes(Path(xnli.ckpt).read_bytes())
    elsewhere = [str(other) if a == xnli.ckpt else a for a in common]
    code, out = run_script(SCRIPT, *elsewhere, '--num_epochs', 3, '--resume', cwd=tmp_path, ok=False)
    assert code == 1 and f'which was fine-tuned from {xnli.ckpt}, but --pretrained_ckpt_path names {other}' in out

    # --resume with more epochs continues at step 68 (optimizer, schedule, best metrics kept)
    _, out = run_script(SCRIPT, *common, '--num_epochs', 3, '--resume', cwd=tmp_path)
    assert 'resuming from out/last at step 68 (epoch 2.00) of 102' in out
    assert f"best so far: accuracy {best_before['accuracy']:.4f} at step {best_before['step']}" in out
    steps = [int(s) for s in re.findall(r'^step (\d+)/102', out, re.M)]
    assert steps[0] == 70 and steps[-1] == 102  # no step before 68 is trained again
    assert re.findall(r'^eval step (\d+) ', out, re.M) == ['102']
    assert max(losses(out)) < first[0]  # it goes on from the trained weights, not from scratch
    state = json.loads((last / 'training_state.json').read_text())
    best_after = json.loads((best / 'training_state.json').read_text())['best']
    assert state['step'] == 102 and [h['step'] for h in state['history']] == [34, 68, 102]
    assert best_after['accuracy'] >= best_before['accuracy']  # the best never gets worse across a resume
    if best_after['step'] == 68:
        assert best_after == best_before
    assert json.loads((tmp_path / 'out' / 'results.json').read_text())['best_step'] == best_after['step']

    # a resume that asks for fewer steps than last/ has trains nothing, and says so
    _, out = run_script(SCRIPT, *common, '--num_epochs', 2, '--resume', cwd=tmp_path)
    assert 'note: out/last is already at step 102, not below this run\'s 68 steps' in out
    assert not re.findall(r'^step \d+/', out, re.M)


def test_an_interrupted_and_resumed_run_ends_where_the_uninterrupted_run_ends(xnli, tmp_path, monkeypatch):
    # in-process (fast): the run is cut right after its save at step 3, then resumed. Only with the AdamW moments and
    # step counts restored from last/optimizer.pt (fresh ones take different first steps), the data order and the
    # RNG state, do the weights and moments after step 6 equal the uninterrupted run's
    monkeypatch.setenv('WORLD_SIZE', '1')  # what torchrun sets for one process: accepted
    monkeypatch.chdir(tmp_path)  # no data/hindi_xnli/xnli.test.tsv here: no test set, the run stays short
    for name, n, seed in (('train', 48, 1), ('valid', 12, 2)):
        (tmp_path / f'{name}.jsonl').write_text(''.join(
            json.dumps({'premise': p, 'hypothesis': h, 'label': y}, ensure_ascii=False) + '\n'
            for p, h, y in make_examples(n, seed)), encoding='utf-8')
    def args(out, *more):
        return ft.get_args(['--train_file', 'train.jsonl', '--valid_file', 'valid.jsonl', '--pretrained_ckpt_path',
                            str(xnli.ckpt), '--tokenizer_name', str(xnli.tokenizer), '--n_head', '2', '--batch_size', '8',
                            '--max_steps', '6', '--eval_interval', '3', '--learning_rate', '2e-3', '--device', 'cpu',
                            '--out_dir', out, *more])
    ft.main(args('whole'))

    interrupted_after_first_save(monkeypatch, ft, lambda: ft.main(args('cut')))
    assert json.loads((tmp_path / 'cut' / 'last' / 'training_state.json').read_text())['step'] == 3
    ft.main(args('cut', '--resume'))

    for name in ('model.pt', 'optimizer.pt'):
        whole = torch.load(tmp_path / 'whole' / 'last' / name, weights_only=True)
        resumed = torch.load(tmp_path / 'cut' / 'last' / name, weights_only=True)
        if name == 'optimizer.pt':
            assert whole['state'][0]['step'] == resumed['state'][0]['step'] == 6
            whole, resumed = ({f'{i}.{k}': v for i, s in o['state'].items() for k, v in s.items()} for o in (whole, resumed))
        assert whole.keys() == resumed.keys()
        for k in whole:
            assert torch.equal(whole[k], resumed[k]), (name, k)


def test_medium_layout_checkpoint_smoke(xnli, tmp_path):
    ckpt = make_random_checkpoint(tmp_path / 'medium.pt', layout='medium', vocab_size=xnli.vocab, **TINY)
    train = tmp_path / 'train.jsonl'  # a Hugging Face style export, with no test set
    train.write_text(''.join(json.dumps({'premise': p, 'hypothesis': h, 'label': y}, ensure_ascii=False) + '\n'
                             for p, h, y in make_examples(120, seed=5)), encoding='utf-8')
    _, out = run_script(SCRIPT, '--train_file', train, '--pretrained_ckpt_path', ckpt, '--tokenizer_name',
                        xnli.tokenizer, '--n_head', 2, '--batch_size', 16, '--num_epochs', 1, '--device', 'cpu', cwd=tmp_path)
    assert 'Format: large-lite (medium keys' in out  # head_dim 32, not 128: the helper calls it large-lite
    assert 'train 108' in out and 'valid 12' in out and 'no test set' in out
    results = json.loads((tmp_path / 'out-xnli' / 'results.json').read_text())
    assert results['split'] == 'validation' and 'no test set' in results['note'] and results['num_examples'] == 12
    assert json.loads((tmp_path / 'out-xnli' / 'best' / 'config.json').read_text())['arch'] == 'medium'


def test_clear_errors_exit_1_without_a_traceback(xnli, tmp_path):
    base = ['--data_dir', xnli.data_dir, '--pretrained_ckpt_path', xnli.ckpt, '--tokenizer_name', xnli.tokenizer,
            '--n_head', 2, '--device', 'cpu']
    code, out = run_script(SCRIPT, *base, '--n_embd', 768, cwd=tmp_path, ok=False)
    assert code == 1 and 'Traceback' not in out
    assert 'error: --n_embd 768 does not match' in out and 'model_dim = 64' in out

    code, out = run_script(SCRIPT, *base, '--n_layer', 8, '--data_dir', tmp_path / 'none', cwd=tmp_path, ok=False)
    assert code == 1 and 'Traceback' not in out and 'xnli.dev.tsv does not exist' in out

    code, out = run_script(SCRIPT, *base[:-4], '--device', 'cpu', cwd=tmp_path, ok=False)  # no --n_head: unknown
    assert code == 1 and 'Traceback' not in out and '--n_head' in out

    code, out = run_script(SCRIPT, '--dataset', 'hindi_xnli', '--batch_size', 16, cwd=tmp_path, ok=False)
    assert code == 1 and '--pretrained_ckpt_path is required' in out


def test_torchrun_with_several_processes_is_refused_before_any_work(xnli, tmp_path, monkeypatch):
    # what torchrun --nproc_per_node=2 sets in each process: without DDP, two copies would write the same out_dir
    for k, v in dict(RANK='0', LOCAL_RANK='0', WORLD_SIZE='2', MASTER_ADDR='127.0.0.1', MASTER_PORT='29500').items():
        monkeypatch.setenv(k, v)
    code, out = run_script(SCRIPT, '--data_dir', xnli.data_dir, '--pretrained_ckpt_path', xnli.ckpt, '--tokenizer_name',
                           xnli.tokenizer, '--n_head', 2, '--max_steps', 1, '--out_dir', 'out', cwd=tmp_path, ok=False)
    assert code == 1 and 'Traceback' not in out and out.count('\n') == 1, out  # one paragraph
    assert 'WORLD_SIZE=2' in out and 'no distributed (DDP) support' in out and 'plain `python finetune_hindi_xnli.py' in out
    assert 'Checkpoint:' not in out and not (tmp_path / 'out').exists()  # nothing loaded, nothing written
