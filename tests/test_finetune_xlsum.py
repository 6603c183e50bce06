"""
Tests for finetune_xlsum.py and what it is built of: the next-token loss, the modded models' LM heads against the
pretraining forward, the key/value cache and beam search, the prompt that keeps its template, mixing and sampling
as the fork does them, packs, and end-to-end runs on a generated six-language dataset (train, resume exactly,
--eval_only), with the bad inputs of the issue.
"""

import argparse
import csv
import json
import math
import os
import random
import shutil
import subprocess
import sys
from contextlib import nullcontext

import pytest
import torch
import torch.nn.functional as F

import core.generative_models as generative_models
import finetune_xlsum as ft
from core.beam_search import beam_search, beam_search_without_cache
from core.checkpoint import read_checkpoint
from core.classifier import read_bundle_tensors
from core.commit import file_checksum, load_tensors, read_json, save_tensors, write_json
from core.generation_data import (EOS_TOKENS, encode_pair, encode_prompt, eos_id, mix, pack_settings, read_packs,
                                  subsample, write_packs)
from core.finetune_data import DataError
from core.tokenizer import hf_spec_from_file, load_tokenizer
from data.synthetic_xlsum import LANGUAGES, make_xlsum_data
from data.synthetic_xnli import round_up
from load_checkpoint_helper import load_pretrained_checkpoint, make_random_checkpoint
from core.bundle import save_bundle
from model import GPT, GPTBatched, GPTConfig, GPTFlexAttention, KVCache
from test_checkpoint_loading import reference_features
from tests.helpers import REPO, interrupted_after_first_save, run_in_process

TINY = dict(num_layers=8, num_heads=2, model_dim=64, head_dim=32)  # layer 7 has no attention, as in every layout


@pytest.fixture(scope='module')
def xlsum(tmp_path_factory):
    """ the generated six-language data, its tokenizer and random small / medium checkpoints of its vocabulary """
    root = tmp_path_factory.mktemp('xlsum')
    paths = make_xlsum_data(root)
    tok = load_tokenizer(hf_spec_from_file(paths['tokenizer']))
    vocab = round_up(tok.vocab_size)
    small = make_random_checkpoint(root / 'small.pt', vocab_size=vocab, **TINY)
    medium = make_random_checkpoint(root / 'medium.pt', layout='medium', vocab_size=tok.vocab_size, num_layers=12,
                                    num_heads=2, model_dim=64, head_dim=32)
    torch.manual_seed(0)  # one of our GPTs, as train.py saves it, with the data's tokenizer
    gpt = save_bundle(root / 'gpt', GPT(GPTConfig(vocab_size=vocab, block_size=128, n_layer=2, n_head=2, n_embd=32)), 0,
                      tokenizer=hf_spec_from_file(paths['tokenizer']))
    return argparse.Namespace(root=root, tok=tok, vocab=vocab, small=small, medium=medium, gpt=gpt, **paths)


def flags(xlsum, *extra):
    """ a short run's command line on the generated data (the fork's flags, small values) """
    return ['--dataset_repo', str(xlsum.xlsum), '--tokenizer_json', str(xlsum.tokenizer), '--context_len', '96',
            '--target_max_tokens', '16', '--per_device_batch_size', '4', '--gradient_accumulation_steps', '2',
            '--learning_rate', '3e-3', '--train_sample_frac', '0.25', '--n_head', '2', '--log_interval', '1',
            *map(str, extra)]


def peaked(model, std=0.5, seed=0):
    """ random weights large enough that the next-token distributions are peaked, as a trained model's are """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * std)
    return model.eval()

# ----------------------------------------------------------------------------- the loss


def test_the_loss_is_the_next_tokens_and_the_forks_would_reward_copying():
    ids = torch.arange(1, 25).view(2, 12)  # no token repeats its neighbour: copying is never right by chance
    labels = ids.clone()
    labels[:, :4] = -100  # the prompt
    sharp = lambda t: F.one_hot(t, 30).float() * 20
    copier, predictor = sharp(ids), sharp(torch.roll(ids, -1, dims=1))  # output token t, or token t + 1
    mean = lambda logits, shifted: (lambda total, count: (total / count).item())(*ft.token_loss(logits, labels, shifted))
    assert mean(predictor, True) < 1e-3 and mean(copier, True) > 10
    assert mean(copier, False) < 1e-3 and mean(predictor, False) > 10  # the fork's loss: the copier wins
    assert ft.token_loss(predictor, labels)[1] == 16  # every target token, predicted from the position before it

def test_the_schedule_steps_and_optimizer_are_the_forks():
    # the fork's LambdaLR: warmup from 0 over int(0.3 x 10) = 3 steps, then linear decay to 0 at step 10
    assert [ft.lr_factor(s, 3, 10) for s in range(11)] == [0, 1 / 3, 2 / 3, 1, 6 / 7, 5 / 7, 4 / 7, 3 / 7, 2 / 7,
                                                           1 / 7, 0]
    args = argparse.Namespace(per_device_batch_size=4, gradient_accumulation_steps=3, num_train_epochs=2.5,
                              max_steps=-1, learning_rate=1e-3, weight_decay=0.1)
    assert ft.step_counts(args, 25) == (3, 8)  # 7 batches of 4 are 3 steps (the last of one batch); 2.5 epochs: 8
    assert ft.step_counts(argparse.Namespace(**{**vars(args), 'max_steps': 5}), 25) == (3, 5)
    assert ft.step_counts(args, 25, world=2) == (2, 5)  # two processes: 4 batches of 2 x 4, 2 steps an epoch
    model = GPTBatched(50, 8, 2, 32, 16, head_dim=16, lm_head_rows=128)
    optimizer = ft.make_optimizer(model, args)
    assert optimizer.defaults['betas'] == (0.9, 0.95)
    decay, none = optimizer.param_groups
    assert (decay['weight_decay'], none['weight_decay']) == (0.1, 0.0)
    assert all(p.dim() >= 2 for p in decay['params']) and [p.shape for p in none['params']] == [model.scalars.shape]


def test_a_step_averages_its_micro_batches_mean_token_losses_and_clips():
    model = peaked(GPTBatched(50, 8, 2, 32, 16, head_dim=16, lm_head_rows=64), std=0.2)
    batches = [[{'input_ids': [1, 2, 3, 4, 5], 'labels': [-100, -100, 3, 4, 5]}],
               [{'input_ids': [6, 7, 8], 'labels': [-100, 7, 8]}, {'input_ids': [9, 10], 'labels': [-100, 10]}]]
    expected = [torch.zeros_like(p) for p in model.parameters()]
    for examples in batches:  # each micro-batch's mean over its own target tokens, then the mean of those
        x, y = ft.collate(examples)
        total, count = ft.token_loss(model(x), y)
        for e, g in zip(expected, torch.autograd.grad(total / count / len(batches), list(model.parameters()))):
            e += g
    before = [p.detach().clone() for p in model.parameters()]
    sgd = torch.optim.SGD(model.parameters(), lr=1.0)
    scaler = torch.amp.GradScaler('cuda', enabled=False)
    ft.train_step(model, sgd, scaler, batches, nullcontext(), 'cpu', 0)
    assert max((b - p.detach() - e).abs().max().item() for b, p, e in zip(before, model.parameters(), expected)) < 1e-5
    ft.train_step(model, sgd, scaler, batches, nullcontext(), 'cpu', 1e-3)
    moved = torch.cat([(b - p.detach()).flatten() for b, p in zip(before, model.parameters())])
    first = torch.cat([e.flatten() for e in expected])
    assert abs((moved - first).norm().item() - 1e-3) < 1e-5  # the second step's whole gradient clipped to norm 1e-3


def test_results_hold_each_language_their_mean_and_the_example_weighted_mean(tmp_path):
    rows = [{'language': 'hindi', 'split': 'test', 'num_examples': 1, 'rouge1': 0.2, 'rouge2': 0.1, 'rougeL': 0.2,
             'bleu': 4.0, 'token_loss': 3.0},
            {'language': 'urdu', 'split': 'test', 'num_examples': 3, 'rouge1': 0.6, 'rouge2': 0.3, 'rougeL': 0.4,
             'bleu': 8.0, 'token_loss': 1.0}]
    args = ft.get_args(['--eval_only', '--model_ckpt', 'm', '--output_json', str(tmp_path / 'r.json')])
    ft.write_results(args, rows, [{'language': 'hindi', 'prediction': 'क', 'reference': 'ख'}], None, None)
    report = json.loads((tmp_path / 'r.json').read_text(encoding='utf-8'))
    assert report['macro']['token_loss'] == 2.0 and report['weighted']['token_loss'] == 1.5
    assert report['weighted']['bleu'] == 7.0 and report['examples'][0]['reference'] == 'ख'
    with open(tmp_path / 'r.csv', encoding='utf-8') as f:
        table = list(csv.reader(f))
    assert table[0] == ['language', 'split', 'num_examples', 'rouge1', 'rouge2', 'rougeL', 'bleu', 'token_loss']
    assert [r[0] for r in table[1:]] == ['hindi', 'urdu', 'macro', 'weighted'] and table[4][2] == '4'

# ----------------------------------------------------------------------------- LM heads, cache, beam search


def capped(z, arch, dim):
    """ the pretraining scripts' logits, written out again from the format document """
    return 30 / (1 + torch.exp(-z / (7.5 * math.sqrt(dim)))) if arch == 'small' else 15 * z / torch.sqrt(z * z + 225)


@pytest.mark.parametrize('layout', ['small', 'medium', 'large-lite'])
def test_lm_headed_models_give_the_pretraining_logits_batched_and_alone(tmp_path, layout):
    shape = {'small': TINY, 'medium': dict(num_layers=12, num_heads=1, model_dim=128, head_dim=128),
             'large-lite': dict(num_layers=12, num_heads=4, model_dim=128, head_dim=32)}[layout]
    path = make_random_checkpoint(tmp_path / 'c.pt', layout='small' if layout == 'small' else 'medium',
                                  vocab_size=250, **shape)
    model, info, checkpoint = load_pretrained_checkpoint(path, num_heads=shape['num_heads'], max_seq_len=32,
                                                         lm_head=True, verbose=False)
    assert info['format'] == layout
    sd = {k.removeprefix('_orig_mod.'): v for k, v in checkpoint['model'].items()}
    arch = 'small' if layout == 'small' else 'medium'
    head = sd['lm_head.weight' if arch == 'small' else 'lm_head_w'].float()
    idx = torch.randint(0, 250, (2, 11), generator=torch.Generator().manual_seed(1))
    idx[1, 6:] = 0  # right padding: the second sequence is 6 tokens long
    with torch.no_grad():
        batched = model(idx)
        for row, length in ((0, 11), (1, 6)):
            alone = idx[row:row + 1, :length]
            expected = capped(reference_features(sd, arch, shape['num_heads'], alone) @ head.T, arch, shape['model_dim'])
            assert (model(alone) - expected).abs().max() < 1e-4
            assert (batched[row:row + 1, :length] - expected).abs().max() < 1e-4
        if layout == 'small':  # the small script's own model, loaded from the same file
            flex = GPTFlexAttention(250, 8, 2, 64, 32, 32)
            flex.load_state_dict({k: v.float() for k, v in sd.items()})
            assert (flex(idx) - batched).abs().max() < 1e-4
    assert batched.shape[-1] == head.shape[0]  # the medium head's padding rows are logits too (masked when generating)


@pytest.mark.parametrize('arch', ['small', 'medium'])
def test_the_cache_gives_every_position_the_logits_of_the_whole_sequence(arch):
    model = peaked(GPTBatched(60, 8, 2, 32, 64, head_dim=16, arch=arch, lm_head_rows=128), std=0.3)
    idx = torch.randint(0, 60, (3, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        whole = model(idx)
        cache = KVCache(20)
        # a prompt, single tokens and a chunk: a key written one position off, or a rotary angle, shows here
        parts = [model(idx[:, a:b], cache) for a, b in ((0, 7), (7, 8), (8, 9), (9, 13), (13, 20))]
    assert cache.length == 20
    assert (torch.cat(parts, 1) - whole).abs().max() < 1e-4


def greedy(model, prompt, steps, eos, vocab):
    """ greedy decoding written plainly: what beam search with one beam must give """
    ids = list(prompt)
    for _ in range(steps):
        with torch.no_grad():
            ids.append(int(model(torch.tensor([ids]))[0, -1, :vocab].argmax()))
        if ids[-1] == eos:
            break
    return ids[len(prompt):]


def test_cached_beam_search_returns_the_cache_free_searchs_sequences():
    model = peaked(GPTBatched(40, 8, 2, 32, 64, head_dim=16, arch='medium', lm_head_rows=128), std=0.4)
    ended = 0
    for seed, length in enumerate((3, 8, 13)):
        prompt = torch.randint(0, 40, (length,), generator=torch.Generator().manual_seed(seed)).tolist()
        eos = greedy(model, prompt, 3, None, 40)[2]  # a token the model likes: some beams end early
        for beams in (1, 2, 3, 5):
            ours = beam_search(model, prompt, 16, beams, eos, vocab_size=40)
            assert ours == beam_search_without_cache(model, prompt, 16, beams, eos, vocab_size=40), (seed, beams)
            assert max(ours) < 40
            ended += ours[-1] == eos
        assert beam_search(model, prompt, 16, 1, eos, 40) == greedy(model, prompt, 16, eos, 40)
    assert ended >= 3  # the ended-beam rules were exercised


class Bigram(torch.nn.Module):
    """ logits that depend on the last token only, from a table: beam search's choices can be worked out by hand """

    def __init__(self, table):
        super().__init__()
        self.table = torch.nn.Parameter(torch.log(torch.tensor(table)))

    def forward(self, idx, cache=None):
        if cache is not None:
            cache.length += idx.size(1)
        return self.table[idx]


class History(torch.nn.Module):
    """ logits that depend on the whole sequence so far (the sum of its ids, mod 7), read from the cache when one is
    given: a beam continued from the wrong row of the cache gets other logits """

    def __init__(self, vocab=6):
        super().__init__()
        self.table = torch.nn.Parameter(torch.randn(7, vocab, generator=torch.Generator().manual_seed(0)) * 1.5)

    def forward(self, idx, cache=None):
        history = idx.double()
        if cache is not None:
            history = cache.update(self, history[:, None, :, None], history[:, None, :, None])[0][:, 0, :, 0]
            cache.length += idx.size(1)
        return self.table[history.cumsum(1)[:, -idx.size(1):].long() % 7]


def test_each_beam_continues_from_its_own_row_of_the_cache():
    model = History()
    for prompt in ([1], [2, 3], [5, 5, 1]):
        for beams in (2, 3, 4):
            assert beam_search(model, prompt, 12, beams, eos_id=None) == \
                beam_search_without_cache(model, prompt, 12, beams, eos_id=None), (prompt, beams)


def test_beam_search_sums_log_probabilities_and_never_emits_padding_rows():
    # after 4 (the prompt): 1 or 2 (column 5, a padding row of the head, is the likeliest: never a token); after 1
    # EOS (0) at 0.3, after 2 EOS at 0.97. Greedy takes 1 then EOS; two beams find 2 then EOS: 0.39 x 0.97 > 0.49 x 0.3
    p = [[0.2, 0.2, 0.2, 0.2, 0.19, 0.01],
         [0.3, 0.2, 0.01, 0.25, 0.23, 0.01],
         [0.97, 0.01, 0.005, 0.005, 0.005, 0.005],
         [0.2, 0.2, 0.2, 0.2, 0.19, 0.01],
         [0.05, 0.3, 0.24, 0.01, 0.01, 0.39],
         [0.2, 0.2, 0.2, 0.2, 0.19, 0.01]]
    model = Bigram(p)
    assert beam_search(model, [4], 5, 1, eos_id=0, vocab_size=5) == [1, 0]
    assert beam_search(model, [4], 5, 2, eos_id=0, vocab_size=5) == [2, 0]
    assert beam_search_without_cache(model, [4], 5, 2, eos_id=0, vocab_size=5) == [2, 0]
    assert beam_search(model, [4], 5, 1, eos_id=0, vocab_size=None)[0] == 5  # unmasked, the padding row wins
    assert beam_search(model, [0], 2, 2, eos_id=0, vocab_size=5) != []  # a prompt ending in EOS is not an ended beam


def test_an_ended_beam_is_carried_and_can_win():
    # after 4: EOS at 0.45 or 1 at 0.55; after 1 the best continuation has 0.3: 0.55 x 0.3 < 0.45, so the beam that
    # ended at the first step wins (no length penalty), as in the fork's search
    p = [[0.2] * 5, [0.1, 0.1, 0.3, 0.25, 0.25], [0.2] * 5, [0.2] * 5, [0.45, 0.55, 0.0, 0.0, 0.0]]
    model = Bigram([[max(x, 1e-9) for x in row] for row in p])
    assert beam_search(model, [4], 4, 2, eos_id=0) == [0]
    assert beam_search(model, [4], 4, 1, eos_id=0)[:2] == [1, 2]  # greedy takes 1

# ----------------------------------------------------------------------------- data


def test_a_long_article_loses_its_end_never_the_template(xlsum):
    tok, template = xlsum.tok, ft.PROMPT
    article = ' '.join(['राष्ट्रपति ने नई शिक्षा नीति की घोषणा की।'] * 40)
    prompt = encode_prompt(tok, template, 'hindi', article, 60)
    assert len(prompt) <= 60
    text = tok.decode(prompt)
    assert text.startswith('[LANG=hindi] Summarize the following article.\nArticle:\nराष्ट्रपति') and \
        text.endswith('\nSummary:\n')
    whole = tok.encode(template.format(language='hindi', source=article))
    assert not tok.decode(whole[:60]).endswith('Summary:\n')  # the fork's cut, prompt_ids[:room], loses it
    short = encode_prompt(tok, template, 'hindi', 'एक छोटा लेख', 60)  # one that fits: tokenised whole, as the fork's
    assert short == tok.encode(template.format(language='hindi', source='एक छोटा लेख'))
    settings = {'context_len': 70, 'target_max_tokens': 5, 'prompt_template': template}
    example = encode_pair(tok, {'language': 'hindi', 'source': article, 'target': article}, settings, 0)
    target = tok.encode(article)[:5] + [0]  # cut to --target_max_tokens, then EOS
    assert example['input_ids'][-6:] == target and len(example['input_ids']) <= 70
    assert example['labels'] == [-100] * example['prompt_len'] + target
    assert encode_pair(tok, {'language': 'hindi', 'source': 'x', 'target': article}, {**settings, 'context_len': 12},
                       0) is None  # not even the template fits: left out, as the fork skips it


def test_mixing_and_sampling_draw_the_forks_rows():
    datasets = pytest.importorskip('datasets')
    sizes = {'english': 7, 'hindi': 3, 'urdu': 5}
    train = {lang: [{'language': lang, 'source': f'{lang}{i}', 'target': ''} for i in range(n)]
             for lang, n in sizes.items()}
    tables = {lang: datasets.Dataset.from_list(rows) for lang, rows in train.items()}
    source = lambda rows: [r['source'] for r in rows]
    # the fork's xlsum_sft_common.py, with datasets' own shuffle, concatenate, filter and select
    natural = datasets.concatenate_datasets(list(tables.values())).shuffle(seed=5)
    assert source(mix(train, 'natural', 5)) == natural['source']
    up = [t if len(t) == 7 else t.select([r.randrange(len(t)) for r in [random.Random(5 + i)] for _ in range(7)])
          for i, t in enumerate(tables.values())]
    balanced = datasets.concatenate_datasets(up).shuffle(seed=5)
    ours = mix(train, 'balanced', 5)
    assert source(ours) == balanced['source'] and len(ours) == 21
    parts = []
    for i, lang in enumerate(sizes):
        mine = balanced.filter(lambda ex: ex['language'] == lang)
        parts.append(mine.shuffle(seed=5 + i).select(range(max(1, int(len(mine) * 0.3)))))
    sampled = datasets.concatenate_datasets(parts).shuffle(seed=5)
    assert source(subsample(ours, list(sizes), 0.3, 5)) == sampled['source']  # 2 + 2 + 2 rows
    assert len(subsample(ours, list(sizes), 0.1, 5)) == 3  # int(0.7) is 0: each language keeps at least one


def test_the_eos_is_the_first_of_the_forks_end_tokens(tmp_path):
    from tokenizers import Tokenizer, models
    tok = Tokenizer(models.WordLevel({'a': 0, 'b': 1}, unk_token='a'))
    tok.add_special_tokens(['</s>', '<eos>', '<pad>'])
    tok.save(str(tmp_path / 't.json'))
    ours = load_tokenizer(hf_spec_from_file(tmp_path / 't.json'))
    assert EOS_TOKENS.index('<eos>') < EOS_TOKENS.index('</s>') and eos_id(ours) == 3  # not our '</s>' first
    plain = Tokenizer(models.WordLevel({'a': 0, 'b': 1}, unk_token='a'))
    plain.save(str(tmp_path / 'p.json'))
    with pytest.raises(DataError, match='50256'):  # none of them, and 50256 is no id of a 2-token vocabulary
        eos_id(load_tokenizer(hf_spec_from_file(tmp_path / 'p.json')))


def test_packs_are_read_back_and_refused_when_built_with_other_settings(xlsum, tmp_path):
    args = ft.get_args(flags(xlsum, '--pretrained_ckpt', xlsum.small))
    spec = hf_spec_from_file(xlsum.tokenizer)
    settings = pack_settings(args, 0, spec)
    examples = {'train': [{'input_ids': [1, 2, 3], 'labels': [-100, 2, 3], 'language': 'hindi', 'prompt_len': 1,
                           'target_len': 2}]}
    write_packs(str(tmp_path / 'packs'), examples, settings)
    assert read_packs(str(tmp_path / 'packs'), settings) == examples
    assert os.listdir(tmp_path) == ['packs']  # the sibling it was built in is gone
    for changed in ({'target_max_tokens': 17}, {'mix_mode': 'natural'}, {'tokenizer_sha256': 'x'}):
        with pytest.raises(DataError, match=f"{next(iter(changed))} .* there, .* here"):
            read_packs(str(tmp_path / 'packs'), {**settings, **changed})

# ----------------------------------------------------------------------------- end to end


def run(xlsum, tmp_path, monkeypatch, *extra):
    monkeypatch.chdir(tmp_path)
    with torch.random.fork_rng(devices=[]):
        ft.main(ft.get_args(flags(xlsum, *extra)))


def last_weights(tmp_path, name):
    return read_bundle_tensors(tmp_path / 'out-xlsum' / 'text' / 'small' / name / 'last', 'model.pt')


@pytest.mark.parametrize('lora', [False, True])
def test_a_cut_run_resumes_exactly_and_its_bundles_evaluate(xlsum, tmp_path, monkeypatch, capsys, lora):
    common = ['--pretrained_ckpt', xlsum.small, '--size', 'small', '--max_steps', 5, '--eval_every_steps', 3,
              *(['--lora_rank', 4] if lora else [])]
    monkeypatch.setitem(ft.SIZES, 'small', (8, 2, 64))  # the tiny checkpoint stands for a small one
    run(xlsum, tmp_path, monkeypatch, *common, '--run_name', 'whole')
    interrupted_after_first_save(monkeypatch, generative_models.ModdedLM,
                                 lambda: run(xlsum, tmp_path, monkeypatch, *common, '--run_name', 'cut'), 'save')
    run(xlsum, tmp_path, monkeypatch, *common, '--run_name', 'cut', '--resume')
    out = capsys.readouterr().out
    assert 'resuming from' in out and 'at step 1 of 5' in out
    whole, cut = last_weights(tmp_path, 'whole'), last_weights(tmp_path, 'cut')
    assert max((whole[k] - cut[k]).abs().max().item() for k in whole) < 1e-6
    run_dir = tmp_path / 'out-xlsum' / 'text' / 'small' / 'whole'
    history = read_json(run_dir / 'last' / 'training_state.json')['history']
    assert [h['step'] for h in history] == [1, 3, 5]  # at step 1, every 3 steps and at the end, as the fork's
    lowest = min(history, key=lambda h: h['val_loss'])
    assert read_json(run_dir / 'best' / 'training_state.json')['step'] == lowest['step']
    assert sorted(os.listdir(run_dir)) == ['best', 'last', 'run_config.json', 'summary.json']
    assert read_checkpoint(run_dir / 'best').kind == 'modded_lm'
    if lora:
        return
    results = tmp_path / 'r.json'
    code, text = run_in_process('finetune_xlsum.py', '--eval_only', '--model_ckpt', run_dir / 'best',
                                '--dataset_repo', xlsum.xlsum, '--context_len', 96, '--max_new_tokens', 8,
                                '--max_eval_samples_per_lang', 2, '--num_beams', 2, '--output_json', results,
                                cwd=tmp_path, monkeypatch=monkeypatch, capsys=capsys)
    assert code == 0, text
    report = json.loads(results.read_text(encoding='utf-8'))
    assert [r['language'] for r in report['per_language']] == list(LANGUAGES)
    assert len(report['examples']) == 12 and all({'prediction', 'reference'} <= set(e) for e in report['examples'])
    assert not any('<|endoftext|>' in e['prediction'] for e in report['examples'])  # cut at the EOS
    with open(tmp_path / 'r.csv', encoding='utf-8') as f:
        rows = list(csv.DictReader(f))
    assert [r['language'] for r in rows] == [*LANGUAGES, 'macro', 'weighted']
    assert abs(float(rows[6]['token_loss']) - sum(r['token_loss'] for r in report['per_language']) / 6) < 1e-9
    broken = tmp_path / 'broken'  # a config.json edited so that it no longer describes model.pt
    shutil.copytree(run_dir / 'best', broken)
    write_json(broken / 'config.json', {**read_json(broken / 'config.json'), 'num_layers': 9})
    evaluate = ['--eval_only', '--model_ckpt', broken, '--context_len', 96, '--max_new_tokens', 8, '--output_json',
                tmp_path / 'b.json']
    code, text = run_in_process('finetune_xlsum.py', *evaluate, cwd=tmp_path, monkeypatch=monkeypatch, capsys=capsys)
    assert code == 1 and f'{broken}/model.pt does not fit its config.json' in text and 'Traceback' not in text
    shutil.rmtree(broken)  # and a model.pt that lacks a weight (its checksum made to fit): refused, never left random
    shutil.copytree(run_dir / 'best', broken)
    weights = load_tensors(broken / 'model.pt')
    del weights['blocks.0.mlp.fc_w']
    save_tensors(broken / 'model.pt', weights)
    manifest = read_json(broken / 'manifest.json')
    manifest['files']['model.pt'] = {'size': (broken / 'model.pt').stat().st_size,
                                     'xxh3_64': file_checksum(broken / 'model.pt')}
    write_json(broken / 'manifest.json', manifest)
    code, text = run_in_process('finetune_xlsum.py', *evaluate, cwd=tmp_path, monkeypatch=monkeypatch, capsys=capsys)
    assert code == 1 and f'{broken}/model.pt does not fit its config.json' in text


def test_our_gpt_fine_tunes_resumes_exactly_with_lora_and_its_bundles_serve_every_tool(xlsum, tmp_path, monkeypatch,
                                                                                       capsys):
    common = ['--pretrained_ckpt', xlsum.gpt, '--max_steps', 4, '--eval_every_steps', 2, '--lora_rank', 4,
              '--lora_alpha', 8]
    run(xlsum, tmp_path, monkeypatch, *common, '--run_name', 'whole')
    interrupted_after_first_save(monkeypatch, generative_models.OurGPT,
                                 lambda: run(xlsum, tmp_path, monkeypatch, *common, '--run_name', 'cut'), 'save')
    run(xlsum, tmp_path, monkeypatch, *common, '--run_name', 'cut', '--resume')
    assert 'of a GPT model (LoRA rank 4' in capsys.readouterr().out
    runs = tmp_path / 'out-xlsum' / 'text' / 'model'
    whole, cut = (read_checkpoint(runs / name / 'last').weights() for name in ('whole', 'cut'))
    assert max((whole[k] - cut[k]).abs().max().item() for k in whole) < 1e-6
    best = read_checkpoint(runs / 'whole' / 'best')
    assert best.kind == 'bundle' and best.training_state['step'] == 4
    adapter = best.training_state['adapter']  # what the run trained with: LoRA on attention and MLP, as --lora_rank says
    assert (adapter['attn_lora_rank'], adapter['mlp_lora_rank'], adapter['lora_alpha']) == (4, 4, 8.0)
    with torch.no_grad():  # the logits the fine-tune scored are GPT's own at every position
        gpt = best.build_model()[0].eval()
        ids = torch.randint(0, 1500, (2, 9))
        assert torch.equal(generative_models.GPTLogits(gpt)(ids), gpt(ids, targets=ids)[0])
    code, text = run_in_process('generate.py', '--checkpoint', runs / 'whole' / 'best', '--num_samples', 1,
                                '--max_new_tokens', 5, cwd=tmp_path, monkeypatch=monkeypatch, capsys=capsys)
    assert code == 0, text
    code, text = run_in_process('finetune_xlsum.py', '--eval_only', '--model_ckpt', runs / 'whole' / 'best',
                                '--dataset_repo', xlsum.xlsum, '--context_len', 96, '--max_new_tokens', 4,
                                '--max_eval_samples_per_lang', 1, '--output_json', tmp_path / 'g.json', cwd=tmp_path,
                                monkeypatch=monkeypatch, capsys=capsys)
    assert code == 0, text
    assert len(json.loads((tmp_path / 'g.json').read_text(encoding='utf-8'))['per_language']) == 6


def test_torchrun_trains_what_one_process_trains_with_their_micro_batches_accumulated(xlsum, tmp_path, monkeypatch):
    # two processes of one micro-batch each per step, and one process accumulating both: the same steps
    common = flags(xlsum, '--pretrained_ckpt', xlsum.small, '--max_steps', 3, '--eval_every_steps', 2,
                   '--per_device_batch_size', 2)
    env = {**os.environ, 'PYTHONPATH': str(REPO), 'OMP_NUM_THREADS': '1', 'PYTHONUNBUFFERED': '1'}
    proc = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                           str(REPO / 'finetune_xlsum.py'), *common, '--gradient_accumulation_steps', '1',
                           '--run_name', 'two'], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count('eval step 2:') == 1  # one process reports
    run(xlsum, tmp_path, monkeypatch, *common[common.index('--per_device_batch_size'):], '--pretrained_ckpt',
        xlsum.small, '--gradient_accumulation_steps', 2, '--run_name', 'one')
    two, one = (read_bundle_tensors(tmp_path / 'out-xlsum' / 'text' / 'model' / n / 'last', 'model.pt')
                for n in ('two', 'one'))
    assert max((two[k] - one[k]).abs().max().item() for k in one) < 1e-6
    history = [read_json(tmp_path / 'out-xlsum/text/model' / n / 'last/training_state.json')['history']
               for n in ('two', 'one')]
    assert [h['step'] for h in history[0]] == [1, 2, 3]  # every process's share of the validation set counted
    assert max(abs(a['val_loss'] - b['val_loss']) for a, b in zip(*history)) < 1e-6
    assert json.loads((tmp_path / 'out-xlsum/text/model/two/run_config.json').read_text())['processes'] == 2


def test_the_forks_command_lines_run_unchanged(xlsum, tmp_path, monkeypatch, capsys):
    # every flag of train_gpt_xlsum_sft_accelerate.py and evaluate_xlsum_generation.py, with paths and sizes adjusted;
    # the tiny checkpoint stands for a small one, whose heads come from the --size table
    monkeypatch.setitem(ft.SIZES, 'small', (8, 2, 64))
    out = tmp_path / 'models'
    train = ['--dataset_repo', xlsum.xlsum, '--dataset_cache_dir', tmp_path / 'cache', '--packed_data_dir',
             tmp_path / 'packs', '--build_packs_if_missing', '--representation', 'ipa_stripped', '--size', 'small',
             '--mix_mode', 'natural', '--tokenizer_json', xlsum.tokenizer, '--pretrained_ckpt', xlsum.small,
             '--context_len', 96, '--target_max_tokens', 16, '--num_train_epochs', 1, '--max_steps', 2,
             '--train_sample_frac', 0.25, '--per_device_batch_size', 1, '--gradient_accumulation_steps', 4,
             '--learning_rate', 1e-5, '--weight_decay', 0.01, '--warmup_ratio', 0.06, '--max_grad_norm', 1.0,
             '--eval_every_steps', 200, '--save_every_steps', 1, '--num_workers', 4, '--dataloader_pin_memory',
             '--mixed_precision', 'bf16', '--seed', 42, '--output_root', out, '--run_name', 'fork']
    code, text = run_in_process('finetune_xlsum.py', *train, cwd=tmp_path, monkeypatch=monkeypatch, capsys=capsys)
    assert code == 0, text
    run_dir = out / 'ipa_stripped' / 'small' / 'fork'
    assert sorted(os.listdir(run_dir)) == ['best', 'last', 'run_config.json', 'step_0000001', 'step_0000002',
                                           'summary.json']
    assert json.loads((tmp_path / 'packs' / 'metadata.json').read_text())['representation'] == 'ipa_stripped'
    evaluate = ['--model_ckpt', run_dir / 'best', '--representation', 'ipa_stripped', '--size', 'small',
                '--dataset_repo', xlsum.xlsum, '--dataset_cache_dir', tmp_path / 'cache', '--split', 'test',
                '--tokenizer_json', xlsum.tokenizer, '--context_len', 96, '--target_max_tokens', 16,
                '--max_new_tokens', 4, '--num_beams', 4, '--max_eval_samples_per_lang', 1, '--batch_size_token_loss', 4,
                '--device', 'cpu', '--output_json', tmp_path / 'e.json', '--output_csv', tmp_path / 'e.csv']
    code, text = run_in_process('finetune_xlsum.py', '--eval_only', *evaluate, cwd=tmp_path, monkeypatch=monkeypatch,
                                capsys=capsys)
    assert code == 0, text
    report = json.loads((tmp_path / 'e.json').read_text(encoding='utf-8'))
    assert report['representation'] == 'ipa_stripped' and (tmp_path / 'e.csv').exists()
    assert any(ord(c) > 127 for e in report['examples'] for c in e['reference'])  # IPA references: ə, ʃ, ...


def test_the_pretraining_checkpoint_evaluates_directly(xlsum, tmp_path, monkeypatch, capsys):
    code, text = run_in_process('finetune_xlsum.py', '--eval_only', '--model_ckpt', xlsum.medium, '--n_head', 2,
                                '--tokenizer_json', xlsum.tokenizer, '--dataset_repo', xlsum.disk, '--from_disk',
                                '--languages', 'hindi', 'urdu', '--split', 'validation', '--context_len', 96,
                                '--max_new_tokens', 4, '--max_eval_samples_per_lang', 1, '--num_beams', 1,
                                '--rouge_tokenizer', 'ascii', '--unshifted_loss', '--output_json', tmp_path / 'm.json',
                                cwd=tmp_path, monkeypatch=monkeypatch, capsys=capsys)
    assert code == 0, text
    rows = json.loads((tmp_path / 'm.json').read_text(encoding='utf-8'))['per_language']
    assert [r['language'] for r in rows] == ['hindi', 'urdu'] and all('token_loss_unshifted' in r for r in rows)


def bad(xlsum, tmp_path, monkeypatch, capsys, *args):
    code, out = run_in_process('finetune_xlsum.py', *flags(xlsum, *args), cwd=tmp_path, monkeypatch=monkeypatch,
                               capsys=capsys)
    assert code == 1 and 'Traceback' not in out, out
    assert not (tmp_path / 'out-xlsum').exists()  # nothing half-written
    return out


def test_a_save_to_disk_folder_is_read_as_one_whatever_the_flag_and_tokenizers_are_checked(xlsum, tmp_path, capsys):
    from core.generation_data import read_pairs
    args = ft.get_args(flags(xlsum, '--pretrained_ckpt', xlsum.small, '--dataset_repo', xlsum.disk))
    without = read_pairs(args)
    assert 'is a save_to_disk folder' in capsys.readouterr().out
    args.from_disk = True
    assert read_pairs(args) == without and list(without['train']) == list(LANGUAGES)
    assert {p['language'] for p in without['train']['urdu']} == {'urdu'}  # each language its own rows
    # a checkpoint's own tokenizer.json is a tokenizer too; one much smaller than the embedding rows is said
    assert ft.find_tokenizer(str(xlsum.gpt / 'tokenizer.json'), flag='--tokenizer_json')[0] == \
        read_checkpoint(xlsum.gpt).tokenizer
    model = GPTBatched(2048, 8, 2, 64, 16, head_dim=32, lm_head_rows=2048)
    ft.check_vocabulary(xlsum.tok, generative_models.MODDED, model, 'm.pt')
    assert 'the tokenizer has 1500 tokens and m.pt 2048 embedding rows' in capsys.readouterr().out
    ft.check_vocabulary(xlsum.tok, generative_models.MODDED, GPTBatched(1536, 8, 2, 64, 16, head_dim=32), 'm.pt')
    assert capsys.readouterr().out == ''  # 1500 padded to 1536: as pretraining pads


def test_bad_inputs_get_one_clear_error_and_leave_nothing_behind(xlsum, tmp_path, monkeypatch, capsys):
    out = bad(xlsum, tmp_path, monkeypatch, capsys, '--pretrained_ckpt', xlsum.small, '--size', 'medium')
    assert '--size medium expects (layers, heads, dim) = (16, 8, 1024)' in out and '(8, 2, 64)' in out
    out = bad(xlsum, tmp_path, monkeypatch, capsys, '--pretrained_ckpt', xlsum.small, '--languages', 'english', 'klingon')
    assert "has no folder 'klingon'" in out and 'english' in out.split('found')[1]
    out = bad(xlsum, tmp_path, monkeypatch, capsys, '--pretrained_ckpt', xlsum.small, '--representation', 'romanized',
              '--source_column', 'text_latin')
    assert "no column 'text_latin'" in out and 'text_romanized' not in out.split('found columns')[0]
    # packs built with other settings
    packs = tmp_path / 'packs'
    with torch.random.fork_rng(devices=[]):
        monkeypatch.chdir(tmp_path)
        args = ft.get_args(flags(xlsum, '--pretrained_ckpt', xlsum.small, '--packed_data_dir', packs,
                                 '--build_packs_if_missing'))
        ft.load_examples(args, xlsum.tok, hf_spec_from_file(xlsum.tokenizer))
    out = bad(xlsum, tmp_path, monkeypatch, capsys, '--pretrained_ckpt', xlsum.small, '--packed_data_dir', packs,
              '--target_max_tokens', '8')
    assert 'target_max_tokens 16 there, 8 here' in out
    # an empty split, from local files
    (tmp_path / 'train.jsonl').write_text(json.dumps({'language': 'hindi', 'text': 'क', 'summary': 'ख'}) + '\n',
                                          encoding='utf-8')
    (tmp_path / 'empty.jsonl').write_text('', encoding='utf-8')
    out = bad(xlsum, tmp_path, monkeypatch, capsys, '--pretrained_ckpt', xlsum.small, '--train_file', 'train.jsonl',
              '--valid_file', 'empty.jsonl', '--test_file', 'train.jsonl')
    assert 'empty.jsonl' in out and 'no examples' in out
    # a tokenizer with more tokens than the checkpoint has embedding rows
    tiny = make_random_checkpoint(tmp_path / 'tiny.pt', vocab_size=256, **TINY)
    out = bad(xlsum, tmp_path, monkeypatch, capsys, '--pretrained_ckpt', tiny)
    assert f'the tokenizer has {xlsum.tok.vocab_size} tokens' in out and 'only 256 embedding rows' in out
