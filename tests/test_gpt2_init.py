"""
nanoGPT's init_from='gpt2' ... 'gpt2-xl': OpenAI's weights found the way transformers finds them (the Hugging Face
cache, offline here). The test makes that cache itself: a tiny random GPT-2 stored under the name 'gpt2-xl', laid out
as the hub client lays out a download (models--NAME/refs/main -> snapshots/COMMIT/...).
"""

import json
import shutil

import pytest
import torch

from core.checkpoint import read_checkpoint
from tests.helpers import REPO, SHARED, needs_gpt2_bpe, run_script
from tests.numerics import assert_same_function, in_float64

COMMIT = '0123456789abcdef0123456789abcdef01234567'


def hub_cache(root, name, vocab_size):
    """ a Hugging Face hub cache holding a tiny random GPT-2 as `name`; returns (cache dir, the model) """
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=1024, vocab_size=vocab_size))
    snapshot = root / 'hub' / f'models--{name}' / 'snapshots' / COMMIT
    model.save_pretrained(snapshot)
    (root / 'hub' / f'models--{name}' / 'refs').mkdir()
    (root / 'hub' / f'models--{name}' / 'refs' / 'main').write_text(COMMIT)
    return root / 'hub', model.eval()


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    monkeypatch.setenv('OMP_NUM_THREADS', '1')


def test_init_from_gpt2_reads_the_hugging_face_cache(tmp_path, monkeypatch):
    cache, hf = hub_cache(tmp_path, 'gpt2', vocab_size=128)
    monkeypatch.setenv('HF_HUB_CACHE', str(cache))
    code, out = run_script('train.py', '--init_from=gpt2', '--dataset=pydocs_char', '--max_iters=2', '--eval_iters=1',
                           '--block_size=64', '--batch_size=2', '--dropout=0.1', '--out_dir=ft', cwd=tmp_path)
    assert f'Initializing from gpt2 ({cache / "models--gpt2" / "snapshots" / COMMIT})' in out
    assert 'loaded hf checkpoint' in out and 'saving checkpoint to ft' in out
    ck = read_checkpoint(tmp_path / 'ft')
    assert ck.step == 2 and ck.config.vocab_size == 128 and ck.config.dropout == 0.1  # nanoGPT's dropout override
    # step 0 is OpenAI's model: the cached weights, as transformers computes them
    code, out = run_script('train.py', '--init_from=gpt2', '--dataset=pydocs_char', '--max_iters=0',
                           '--eval_iters=1', '--block_size=64', '--out_dir=zero', cwd=tmp_path)
    assert 'nothing was saved' in out
    ids = torch.randint(0, 103, (2, 16), generator=torch.Generator().manual_seed(0))
    ours = read_checkpoint(cache / 'models--gpt2' / 'snapshots' / COMMIT).build_model()[0].eval()
    with torch.no_grad():
        assert_same_function(ours(ids, ids)[0], hf(ids).logits)
        ours, hf = in_float64(ours, hf)
        assert_same_function(ours(ids, ids)[0], hf(ids).logits)


def test_init_from_gpt2_offline_without_the_weights_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv('HF_HUB_CACHE', str(tmp_path / 'empty'))
    code, out = run_script('train.py', '--init_from=gpt2-medium', '--max_iters=1', cwd=tmp_path, ok=False)
    assert code == 1 and 'Traceback' not in out
    assert "init_from = 'gpt2-medium': OpenAI's GPT-2 weights are neither in the Hugging Face cache" in out
    assert "save_pretrained(DIR), as init_from=DIR" in out and not (tmp_path / 'out').exists()


@needs_gpt2_bpe
def test_the_shipped_finetune_shakespeare_configs(tmp_path, monkeypatch):
    # nanoGPT's config/finetune_shakespeare.py (gpt2-xl, here a tiny stand-in in the cache) and its LoRA variant, as
    # shipped but for a short run; the data is tiny Shakespeare in GPT-2 BPE, prepared from a local copy
    cache, _ = hub_cache(tmp_path, 'gpt2-xl', vocab_size=50257)
    monkeypatch.setenv('HF_HUB_CACHE', str(cache))
    text = SHARED / 'data' / 'tinyshakespeare' / 'input.txt'
    if not text.is_file():
        text = tmp_path / 'input.txt'
        text.write_text('First Citizen:\nBefore we proceed any further, hear me speak.\n' * 400)
    run_script('data/prepare.py', '--dataset', 'shakespeare', '--input', text, '--out_dir', 'data/shakespeare',
               cwd=tmp_path)
    shutil.copytree(REPO / 'config', tmp_path / 'config')
    # short: and a 2-step run cannot promise the improvement that always_save_checkpoint=False waits for
    short = ['--max_iters=2', '--eval_iters=1', '--gradient_accumulation_steps=2', '--always_save_checkpoint=True']
    code, out = run_script('train.py', 'config/finetune_shakespeare.py', *short, cwd=tmp_path)
    assert 'Initializing from gpt2-xl' in out and "tokens per iteration will be: 2,048" in out
    code, out = run_script('train.py', 'config/finetune_shakespeare_lora.py', *short, cwd=tmp_path)
    assert 'Initializing from gpt2-xl' in out and '(0.01M trainable)' in out # rank 8 on 2 layers x 32: 8,192
    for run in ('out-shakespeare', 'out-shakespeare-lora'):
        assert read_checkpoint(tmp_path / run).tokenizer == {'token_kind': 'gpt2'}
    assert (tmp_path / 'out-shakespeare-lora' / 'adapter.pt').is_file()
    state = json.loads((tmp_path / 'out-shakespeare-lora' / 'training_state.json').read_text())
    assert state['adapter']['attn_lora_rank'] == 8 and state['adapter']['mlp_lora_rank'] == 8


def test_nanogpts_sample_command_samples_what_generate_samples(tmp_path):
    # nanoGPT users type `python sample.py --out_dir=...`: the same code as generate.py, nanoGPT's spelling
    from core.checkpoint import save_bundle
    from model import GPT, GPTConfig
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=32, vocab_size=96))
    model.tokenizer_spec = {'token_kind': 'char', 'chars': [chr(32 + i) for i in range(95)] + ['\n']}
    save_bundle(tmp_path / 'out-x', model, 3, None)
    (tmp_path / 'prompt.txt').write_text('To be')
    _, ours = run_script('sample.py', '--out_dir=out-x', '--start=FILE:prompt.txt', '--num_samples=2',
                         '--max_new_tokens=30', '--seed=7', '--device=cpu', cwd=tmp_path)
    _, theirs = run_script('generate.py', '--checkpoint', 'out-x', '--start', 'FILE:prompt.txt', '--num_samples', 2,
                           '--max_new_tokens', 30, '--seed', 7, '--device', 'cpu', cwd=tmp_path)
    samples = lambda out: [s[s.index('To be'):] for s in out.split('---------------') if 'To be' in s]
    assert len(samples(ours)) == 2 and [s.strip() for s in samples(ours)] == [s.strip() for s in samples(theirs)]
    assert all(len(s.strip()) == len('To be') + 30 for s in samples(ours))


@pytest.mark.parametrize('field, value', [('layer_norm_epsilon', 1e-6), ('scale_attn_weights', False),
                                          ('scale_attn_by_inverse_layer_idx', True), ('reorder_and_upcast_attn', True),
                                          ('tie_word_embeddings', False), ('activation_function', 'relu')])
def test_a_gpt2_config_we_cannot_compute_is_refused_by_name(tmp_path, field, value):
    from transformers import GPT2Config, GPT2LMHeadModel
    from core.checkpoint import CheckpointError
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, n_positions=32, vocab_size=64,
                               **{field: value})).save_pretrained(tmp_path / 'hf')
    with pytest.raises(CheckpointError) as e:
        read_checkpoint(tmp_path / 'hf').build_model()
    assert field.split('_function')[0] in str(e.value) and repr(value) in str(e.value)
    code, out = run_script('generate.py', '--checkpoint', tmp_path / 'hf', cwd=tmp_path, ok=False)
    assert code == 1 and 'Traceback' not in out and 'config.json: ' in out


def test_a_gpt2_config_with_its_own_mlp_width_computes_exactly(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=16, n_positions=32, vocab_size=64, n_inner=40)).eval()
    hf.save_pretrained(tmp_path / 'hf')
    ours = read_checkpoint(tmp_path / 'hf').build_model()[0].eval()
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    assert ours.config.n_hidden == 40
    with torch.no_grad():
        assert_same_function(ours(ids, ids)[0], hf(ids).logits)
        ours, hf = in_float64(ours, hf)
        assert_same_function(ours(ids, ids)[0], hf(ids).logits)
