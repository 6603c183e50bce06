"""
finetune_hindi_xnli.py as the modded-nanogpt fork's users run it (issue 12): data through Hugging Face `datasets`
(a local dataset folder as --parent_dataset, a save_to_disk folder, parquet files), any number of text columns and
classes, the fork's flags, and --eval_only's results_<label>.json checked against scikit-learn. The data is tiny
and made by `datasets` itself (data/synthetic_xnli.py: make_hf_datasets); everything runs offline.
"""

import argparse
import json

import pytest
import torch
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, fbeta_score, recall_score

import finetune_hindi_xnli as ft
from core.finetune_data import find_tokenizer
from core.tokenizer import TokenizerError, hf_spec_from_file, load_tokenizer
from load_checkpoint_helper import load_pretrained_checkpoint, make_random_checkpoint
from tests.helpers import interrupted_after_first_save, run_script
from data.synthetic_xnli import LABELS, make_hf_datasets, round_up, train_tokenizer, make_examples

SCRIPT = 'finetune_hindi_xnli.py'
TINY = dict(num_layers=8, num_heads=2, model_dim=64, head_dim=32)


@pytest.fixture(scope='module')
def hf(tmp_path_factory):
    """ the datasets, a BPE tokenizer for their text and a small-layout random checkpoint that fits it """
    root = tmp_path_factory.mktemp('hf')
    make_hf_datasets(root)
    tokenizer = train_tokenizer([t for p, h, _ in make_examples(300, 0) for t in (p, h)], root / 'tokenizer.json')
    vocab = round_up(load_tokenizer(hf_spec_from_file(tokenizer)).vocab_size)
    ckpt = make_random_checkpoint(root / 'small.pt', layout='small', vocab_size=vocab, **TINY)
    return argparse.Namespace(root=root, tokenizer=tokenizer, ckpt=ckpt)


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv('OMP_NUM_THREADS', '1')
    monkeypatch.setenv('HF_DATASETS_OFFLINE', '1')
    monkeypatch.setenv('HF_DATASETS_CACHE', str(tmp_path / 'datasets-cache'))


def ours(hf):
    """ what our script needs beyond the fork's command: the tiny checkpoint (not a known size: --n_head), its tokenizer """
    return ['--pretrained_ckpt_path', hf.ckpt, '--tokenizer_name', hf.tokenizer, '--n_head', 2, '--device', 'cpu',
            '--learning_rate', 2e-3, '--head_learning_rate', 3e-3]


def test_the_forks_readme_command_then_eval_only_like_its_evaluate_py(hf, tmp_path):
    # the fork's README command, with a local dataset folder in place of the hub name
    fork = ['--no_subset', '--dataset', 'xnli-en-es-normal', '--parent_dataset', hf.root / 'hf' / 'xnli-hi',
            '--text_column', 'premise', 'hypothesis', '--label_column', 'label', '--num_classes', 3, '--batch_size', 16,
            '--num_epochs', 3]
    _, out = run_script(SCRIPT, *fork, *ours(hf), '--out_dir', 'out', cwd=tmp_path)
    where = hf.root / 'hf' / 'xnli-hi'
    assert (f'train 240 from {where} [train], valid 60 from {where} [validation], test 90 from {where} [test]; '
            'classes entailment, neutral, contradiction') in out
    assert 'step 45/45 (epoch 3)' in out  # 240 / 16 = 15 steps per epoch
    results = json.loads((tmp_path / 'out' / 'results.json').read_text())
    assert results['split'] == 'test' and results['num_examples'] == 90 and results['accuracy'] > 0.5  # chance 1/3
    assert {'f1_score', 'f2_score', 'recall', 'macro_f1', 'confusion_matrix'} <= set(results)

    # --eval_only: best/ on another copy of the data (the save_to_disk one), the fork's evaluate.py JSON
    _, out = run_script(SCRIPT, '--eval_only', '--checkpoint_path', 'out/best', '--datasets',
                        hf.root / 'hf' / 'xnli-hi-disk', '--from_disk', '--dataset_labels', 'hi', '--split', 'test',
                        '--output_dir', 'eval', cwd=tmp_path)
    report = json.loads((tmp_path / 'eval' / 'results_hi.json').read_text())
    assert report['checkpoint_path'] == 'out/best' and report['split'] == 'test'
    assert report['text_columns'] == ['premise', 'hypothesis'] and report['label_column'] == 'label'
    best = json.loads((tmp_path / 'out' / 'best' / 'training_state.json').read_text())['metrics']
    assert report['checkpoint_info'] == {'val_loss': best['loss'], 'val_accuracy': best['accuracy'],
                                         'val_f2': best['f2_score']}
    r = report['results']['hi']
    import datasets
    gold = datasets.load_from_disk(str(hf.root / 'hf' / 'xnli-hi-disk'))['test']['label']
    assert r['labels'] == gold and r['num_examples'] == 90 and r['split'] == 'test'
    assert r['predictions'] == [max(range(3), key=row.__getitem__) for row in r['logits']]
    # the metrics, recomputed here by scikit-learn from the labels and predictions
    pred = r['predictions']
    assert r['accuracy'] == pytest.approx(accuracy_score(gold, pred))
    assert r['f1_score'] == pytest.approx(f1_score(gold, pred, average='macro'))
    assert r['f2_score'] == pytest.approx(fbeta_score(gold, pred, beta=2, average='macro'))
    assert r['recall'] == pytest.approx(recall_score(gold, pred, average='macro'))
    assert r['confusion_matrix'] == confusion_matrix(gold, pred).tolist()
    assert r['accuracy'] == pytest.approx(results['accuracy'])  # the same test examples as the training run's
    # and the logits are the model's: the first examples recomputed from best/ in this process
    model, config, spec = ft.load_classifier(str(tmp_path / 'out' / 'best'))
    tok = load_tokenizer(spec)
    test = datasets.load_from_disk(str(hf.root / 'hf' / 'xnli-hi-disk'))['test']
    data = ft.encode_dataset([(p, h, y) for p, h, y in zip(test['premise'][:4], test['hypothesis'][:4], gold[:4])],
                             tok, ft.separator(tok), config['max_seq_len'], config['vocab_size'], 'test')
    x, lengths, _ = ft.collate(data)
    with torch.no_grad():
        logits = model.eval()(x, lengths)
    assert (logits - torch.tensor(r['logits'][:4])).abs().max() < 1e-5

    # without --datasets: the training command's own data and --split, written as results_<dataset>.json
    run_script(SCRIPT, *fork, '--eval_only', '--out_dir', 'out', '--split', 'validation', cwd=tmp_path)
    own = json.loads((tmp_path / 'out' / 'results_xnli-en-es-normal.json').read_text())
    assert own['results']['xnli-en-es-normal']['num_examples'] == 60
    assert own['results']['xnli-en-es-normal']['accuracy'] == pytest.approx(best['accuracy'])


def test_save_to_disk_classlabel_and_parquet_files(hf, tmp_path):
    _, out = run_script(SCRIPT, '--from_disk', '--parent_dataset', hf.root / 'hf' / 'xnli-hi-disk', *ours(hf),
                        '--max_steps', 2, '--force_tokenization', '--eval_iters', 10, '--out_dir', 'disk', cwd=tmp_path)
    assert 'classes entailment, neutral, contradiction' in out and 'train 240 from' in out
    assert 'note: --force_tokenization: this script keeps no tokenized cache' in out
    assert 'note: --eval_iters 10 is not used: every evaluation covers the whole validation split' in out
    config = json.loads((tmp_path / 'disk' / 'best' / 'config.json').read_text())
    assert config['labels'] == list(LABELS) and config['num_classes'] == 3

    files = hf.root / 'hf' / 'xnli-hi'
    _, out = run_script(SCRIPT, '--train_file', files / 'train.parquet', '--valid_file', files / 'validation.parquet',
                        '--test_file', files / 'test.parquet', *ours(hf), '--max_steps', 2, '--out_dir', 'files',
                        cwd=tmp_path)
    assert f'train 240 from {files / "train.parquet"}, valid 60 from {files / "validation.parquet"}, test 90' in out
    assert not (tmp_path / 'datasets-cache').exists() or not any((tmp_path / 'datasets-cache').rglob('*.arrow'))


def test_a_single_text_binary_task(hf, tmp_path):
    _, out = run_script(SCRIPT, '--parent_dataset', hf.root / 'hf' / 'negation', '--no_subset', '--text_column',
                        'sentence', '--num_classes', 2, *ours(hf), '--num_epochs', 2, '--out_dir', 'neg', cwd=tmp_path)
    assert 'classes 0, 1;' in out
    results = json.loads((tmp_path / 'neg' / 'results.json').read_text())
    assert results['labels'] == ['0', '1'] and len(results['confusion_matrix']) == 2
    assert results['num_examples'] == 90 and results['accuracy'] > 0.8  # 'नहीं' or not: 60 / 30, learnt at once
    config = json.loads((tmp_path / 'neg' / 'best' / 'config.json').read_text())
    assert config['num_classes'] == 2 and torch.load(tmp_path / 'neg' / 'best' / 'model.pt',
                                                     weights_only=True)['head.weight'].shape == (2, 64)


def test_gradient_accumulation_is_one_big_batch(hf, tmp_path, monkeypatch):
    # 2 micro-batches of 8 per step must train exactly what one batch of 16 trains (dropout 0: no randomness)
    monkeypatch.chdir(tmp_path)
    files = hf.root / 'hf' / 'xnli-hi'
    def run(out, batch, accum):
        ft.main(ft.get_args([str(a) for a in ['--train_file', files / 'train.parquet', '--valid_file',
                                               files / 'validation.parquet', *ours(hf), '--max_steps', 3,
                                               '--dropout', 0, '--no_decay_lr', '--batch_size', batch,
                                               '--gradient_accumulation_steps', accum, '--out_dir', out]]))
        return torch.load(tmp_path / out / 'last' / 'model.pt', weights_only=True)
    one, two = run('one', 16, 1), run('two', 8, 2)
    state = json.loads((tmp_path / 'two' / 'last' / 'training_state.json').read_text())
    assert state['steps_per_epoch'] == 15 and state['step'] == 3  # 240 / (8 x 2)
    # the sums run in another order, and 3 AdamW steps at lr 2e-3 move each weight by at most 6e-3: rounding stays
    # far below 1e-4 of it, while a step that drops a micro-batch moves the weights by the order of lr
    assert max((one[k].float() - two[k].float()).abs().max().item() for k in one) < 1e-4
    fresh = ft.load_classifier(str(tmp_path / 'one' / 'last'))[0].state_dict()
    assert max((fresh[k].float() - one[k].float()).abs().max().item() for k in one) == 0
    pretrained = load_pretrained_checkpoint(hf.ckpt, num_heads=2, max_seq_len=256)[0].state_dict()
    assert max((one[f'backbone.{k}'].float() - v.float()).abs().max().item() for k, v in pretrained.items()) > 1e-3


def test_tokenizer_lookup_as_the_fork_does_it(hf, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / 'tokenizers').mkdir()
    (tmp_path / 'tokenizers' / 'bpe-hin-tokenizer.json').write_bytes(hf.tokenizer.read_bytes())
    spec = hf_spec_from_file(hf.tokenizer)
    assert find_tokenizer('bpe-hin')[0] == spec  # tokenizers/{name}-tokenizer.json
    assert find_tokenizer(str(hf.tokenizer))[0] == spec  # a path
    assert find_tokenizer('gpt2')[0] == {'token_kind': 'gpt2'}
    with pytest.raises(TokenizerError, match=r"no tokenizer 'nope'.*tokenizers/nope\.json, tokenizers/nope-tokenizer"):
        find_tokenizer('nope')


def test_lora_fine_tuning_saves_merged_weights_and_resumes_its_adapters(hf, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    files = hf.root / 'hf' / 'xnli-hi'
    def args(out, *more):
        return ft.get_args([str(a) for a in ['--train_file', files / 'train.parquet', '--valid_file',
                                              files / 'validation.parquet', *ours(hf), '--max_steps', 6,
                                              '--eval_interval', 3, '--batch_size', 8, '--lora_rank', 4,
                                              '--lora_alpha', 8, '--out_dir', out, *more]])
    ft.main(args('whole'))
    last, best = tmp_path / 'whole' / 'last', tmp_path / 'whole' / 'best'
    assert (last / 'adapter.pt').is_file() and not (best / 'adapter.pt').exists()
    assert json.loads((last / 'config.json').read_text())['lora'] == {'rank': 4, 'alpha': 8.0}
    _, out = run_script('inspect_model.py', '--checkpoint', last, cwd=tmp_path)
    assert 'trained with: LoRA rank 4, alpha 8.0 on attention and MLP (merged in model.pt; the factors in adapter.pt)' in out

    # the LoRA model of last/ (merged weights + its factors, as --resume builds it) vs last/ loaded as a plain model
    lora_model, config, spec, _ = ft.build_classifier(args('whole', '--resume'), str(last), list(LABELS))
    trainable = {n for n, p in lora_model.named_parameters() if p.requires_grad}
    assert trainable and all('lora_' in n or n.startswith('head.') for n in trainable)
    # rank 4: 7 attention layers, qkvo_w a stack of 4 [64, 64] (A [4, 64], B [64, 4] each); 8 MLPs, fc_w [256, 64]
    # and proj_w [64, 256]
    assert sum(p.numel() for n, p in lora_model.named_parameters() if 'lora_' in n) == 7 * 4 * (4 * 64 + 64 * 4) + 8 * (
        (4 * 64 + 256 * 4) + (4 * 256 + 64 * 4))
    plain = ft.load_classifier(str(last))[0]
    tok = load_tokenizer(spec)
    data = ft.encode_dataset([(p, h, y) for p, h, y in make_examples(16, 9)], tok, ft.separator(tok), 256,
                             config['vocab_size'], 'check')
    x, lengths, _ = ft.collate(data)
    with torch.no_grad():
        diff = (lora_model.eval()(x, lengths) - plain.eval()(x, lengths)).abs().max().item()
    assert diff < 1e-5, diff
    # the merged weights use the layout's own keys: a plain classifier loads them strictly
    weights = torch.load(last / 'model.pt', weights_only=True)
    assert set(weights) == set(ft.NLIClassifier(plain.backbone.__class__(
        config['vocab_size'], 8, 2, 64, 256, head_dim=32, arch='small'), 3).state_dict())

    # cut after the save at step 3, resumed: adapters, base and optimizer state end where the whole run ends
    interrupted_after_first_save(monkeypatch, ft, lambda: ft.main(args('cut')))
    saved = torch.load(tmp_path / 'cut' / 'last' / 'adapter.pt', weights_only=True)
    resumed, *_ = ft.build_classifier(args('cut', '--resume'), str(tmp_path / 'cut' / 'last'), list(LABELS))
    assert all(torch.equal(resumed.state_dict()[k], v) for k, v in saved.items())  # the factors, by value
    ft.main(args('cut', '--resume'))
    for name in ('model.pt', 'adapter.pt', 'optimizer.pt'):
        whole = torch.load(last / name, weights_only=True)
        cut = torch.load(tmp_path / 'cut' / 'last' / name, weights_only=True)
        if name == 'optimizer.pt':
            assert whole['state'][0]['step'] == cut['state'][0]['step'] == 6
            whole, cut = ({f'{i}.{k}': v for i, s in o['state'].items() for k, v in s.items()} for o in (whole, cut))
        assert whole.keys() == cut.keys()
        worst = max((whole[k].float() - cut[k].float()).abs().max().item() for k in whole)
        assert worst < 1e-6, (name, worst)  # the base is rebuilt as merged - B @ A * alpha/r: a float32 rounding of weights below 1


def glue_like(root):
    """ a GLUE-style single-sentence task as save_to_disk: int labels (no ClassLabel), an unlabeled test split (-1),
    a language column with two languages, and premise / hypothesis plus phoneme-like copies of them """
    import datasets
    def split(n, seed, labeled=True):
        rows = make_examples(n, seed)
        return datasets.Dataset.from_dict({
            'sentence': [h for _, h, _ in rows], 'label': [int('नहीं' in h) if labeled else -1 for _, h, _ in rows],
            'language': ['en', 'es'] * (n // 2)})
    path = root / 'glue-like'
    datasets.DatasetDict({'train': split(120, 1), 'validation': split(30, 2), 'test': split(30, 3, False)}).save_to_disk(
        str(path))
    return path


def test_the_forks_glue_and_multilingual_data(hf, tmp_path):
    # GLUE's test labels are -1 (scored on its server): the fork reads train and validation only; the label count
    # comes from the data (2 here, the fork's default); a language column is not a filter unless --language says so
    data = glue_like(tmp_path)
    _, out = run_script(SCRIPT, '--from_disk', '--parent_dataset', data, '--dataset', 'sst2', '--text_column', 'sentence',
                        *ours(hf), '--max_steps', 3, '--block_size', 8, '--out_dir', 'glue', cwd=tmp_path)
    assert f'note: {data} [test] is unlabeled (every label is -1, as in GLUE): it is not scored here' in out
    assert f'data: train 120 from {data} [train], valid 30 from {data} [validation], test 0' in out
    assert 'classes 0, 1;' in out and 'are longer than --block_size 8 tokens and were cut' in out
    results = json.loads((tmp_path / 'glue' / 'results.json').read_text())
    assert results['split'] == 'validation' and results['num_examples'] == 30
    _, out = run_script(SCRIPT, '--from_disk', '--parent_dataset', data, '--text_column', 'sentence', *ours(hf),
                        '--max_steps', 1, '--language', 'es', '--out_dir', 'glue', cwd=tmp_path)
    assert 'data (es): train 60 from' in out and 'note: glue holds an earlier run (step 3)' in out


def test_eval_only_reads_the_columns_the_model_was_trained_on(hf, tmp_path):
    import datasets
    disk = datasets.load_from_disk(str(hf.root / 'hf' / 'xnli-hi-disk'))
    # the fork's phonemized variants: other text in suffixed columns (here the real pair; the plain columns swapped)
    phon = datasets.DatasetDict({k: v.add_column('premise-phoneme', v['premise']).add_column(
        'hypothesis-phoneme', v['hypothesis']).map(lambda r: {'premise': r['hypothesis'], 'hypothesis': r['premise']})
        for k, v in disk.items()})
    phon.save_to_disk(str(tmp_path / 'phon'))
    run_script(SCRIPT, '--from_disk', '--parent_dataset', tmp_path / 'phon', '--text_column', 'premise-phoneme',
               'hypothesis-phoneme', *ours(hf), '--max_steps', 2, '--out_dir', 'out', cwd=tmp_path)
    _, out = run_script(SCRIPT, '--eval_only', '--out_dir', 'out', '--datasets', tmp_path / 'phon', '--from_disk',
                        cwd=tmp_path)
    report = json.loads((tmp_path / 'out' / 'results_phon.json').read_text())
    assert report['text_columns'] == ['premise-phoneme', 'hypothesis-phoneme']
    code, out = run_script(SCRIPT, '--eval_only', '--out_dir', 'out', '--datasets', tmp_path / 'phon',
                           tmp_path / 'phon', '--from_disk', cwd=tmp_path, ok=False)
    assert code == 1 and 'two of them would both write results_phon.json; name each with --dataset_labels' in out
    _, out = run_script('inspect_model.py', '--checkpoint', tmp_path / 'out' / 'best', cwd=tmp_path)
    assert 'trained with: full fine-tuning' in out and 'text columns premise-phoneme, hypothesis-phoneme' in out
