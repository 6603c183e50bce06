"""
peft's LoRA adapters, both ways, checked with peft and transformers themselves (tiny random GPT-2s, no hub):
convert_checkpoints.py --to peft gives peft our LoRA model's logits and merge_and_unload() our merged bundle's; an
adapter made by peft's own get_peft_model continues in train.py (adapter_from) from the same logits; what our LoRA
cannot compute exactly is refused by name. And the Hugging Face export's tokenizer: AutoTokenizer gives our ids.
"""

import json
import re
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from core.checkpoint import CheckpointError, read_checkpoint, save_bundle
from core.peft_adapter import read_peft
from core.tokenizer import char_spec, load_tokenizer
from core.training import read_resume_check
from data.prepare import pydocs_text
from model import GPT, GPTConfig
from tests.helpers import GPT2_BPE, REPO, TIKTOKEN_CACHE, TINY_CONFIG, Logits, make_peft_adapter, needs_gpt2_bpe, run_script

TOL = 1e-4
LORA = dict(attn_lora_rank=4, mlp_lora_rank=2, embedding_mode='lora', embedding_rank=3, lora_alpha=8.0)
TEXT = 'Hello, World! 3 spaces   here,\ttabs\nand lines: café, naïve; 42 + 7 = 49.\n'


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    monkeypatch.setenv('OMP_NUM_THREADS', '1')


def chars():
    """ pydocs_char's vocabulary, as data/prepare.py makes it (train.py prepares the files on first use) """
    return char_spec(pydocs_text())['chars']


def lora_bundle(path, spec, bias=True, **adapters):
    """ a bundle of a LoRA run whose factors are not at their init (B != 0), as train.py saves it """
    torch.manual_seed(0)
    vocab = load_tokenizer(spec).vocab_size
    model = GPT(GPTConfig(vocab_size=vocab, block_size=32, n_layer=2, n_head=2, n_embd=16, bias=bias, **adapters))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if '.lora_' in name:
                p.normal_(0, 0.2)
    save_bundle(path, model, 5, tokenizer=spec, val_loss=2.5)
    return model.eval()


def logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(ids, ids)[0]


def peft_made(directory, vocab_size, targets, steps=3, **options):
    """ a base GPT-2 in directory/base and an adapter made and trained by peft itself in directory/adapter """
    return make_peft_adapter(directory / 'base', directory / 'adapter', vocab_size, targets, steps=steps, **options)


def test_export_to_peft_gives_our_lora_logits_and_merges_to_our_merged_bundle(tmp_path):
    from peft import PeftModel
    from transformers import GPT2LMHeadModel
    ours = lora_bundle(tmp_path / 'lora', {'token_kind': 'char', 'chars': chars()}, **LORA)
    code, out = run_script('convert_checkpoints.py', 'lora', '--to', 'peft', 'adapter', cwd=tmp_path)
    assert 'lora -> adapter (peft)' in out
    config = json.loads((tmp_path / 'adapter' / 'adapter_config.json').read_text())
    assert (config['r'], config['lora_alpha'], config['rank_pattern']) == (4, 8.0, {'mlp.c_fc': 2, 'mlp.c_proj': 2,
                                                                                     'wte': 3, 'lm_head': 3})
    theirs = PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(tmp_path / 'adapter' / 'base'), tmp_path / 'adapter')
    ids = torch.randint(0, len(chars()), (2, 32), generator=torch.Generator().manual_seed(0))
    diff = (logits(Logits(theirs), ids) - logits(ours, ids)).abs().max().item()
    assert diff <= TOL, f'peft gives other logits than our LoRA model: {diff:.1e}'
    merged = logits(Logits(theirs.merge_and_unload()), ids)
    diff = (merged - logits(read_checkpoint(tmp_path / 'lora').build_model()[0], ids)).abs().max().item()
    assert diff <= TOL, f"peft's merge_and_unload differs from our merged bundle: {diff:.1e}"
    # and the adapter continues here, its own directory holding the base (adapter_from alone), every factor restored
    out = run_script('train.py', TINY_CONFIG, '--adapter_from', tmp_path / 'adapter', '--out_dir', 'again',
                     '--max_iters', 1, '--learning_rate', 0, '--min_lr', 0, '--block_size', 32, cwd=tmp_path)[1]
    assert '9 adapters restored' in out and 'initialised fresh' not in out, out[-2000:]
    again = read_checkpoint(tmp_path / 'again')
    assert {k: again.training_state['adapter'][k] for k in LORA} == LORA
    diff = (logits(again.build_model(**LORA)[0], ids) - logits(ours, ids)).abs().max().item()
    assert diff <= TOL, diff


def test_a_lora_run_without_biases_goes_to_peft_with_zero_biases_in_its_base(tmp_path):
    from peft import PeftModel
    from transformers import GPT2LMHeadModel
    ours = lora_bundle(tmp_path / 'lora', {'token_kind': 'char', 'chars': chars()}, bias=False, attn_lora_rank=4)
    run_script('convert_checkpoints.py', 'lora', '--to', 'peft', 'adapter', cwd=tmp_path)
    base = GPT2LMHeadModel.from_pretrained(tmp_path / 'adapter' / 'base')
    assert not base.transformer.h[0].attn.c_attn.bias.any()
    theirs = PeftModel.from_pretrained(base, tmp_path / 'adapter')
    ids = torch.randint(0, len(chars()), (2, 32), generator=torch.Generator().manual_seed(0))
    diff = (logits(Logits(theirs), ids) - logits(ours, ids)).abs().max().item()
    assert diff <= TOL, f'peft gives other logits than our LoRA model: {diff:.1e}'
    back = read_checkpoint(tmp_path / 'adapter')
    assert back.config.bias is False
    assert (logits(back.build_model(attn_lora_rank=4)[0], ids) - logits(ours, ids)).abs().max().item() <= TOL


@pytest.mark.parametrize('targets, restored, fresh', [(('c_attn', 'c_proj', 'c_fc'), 8, 0), (('c_attn',), 2, 2)])
def test_a_peft_made_adapter_continues_in_train_py_from_the_same_logits(tmp_path, targets, restored, fresh):
    theirs = peft_made(tmp_path, len(chars()), targets)
    out = run_script('train.py', TINY_CONFIG, '--init_from', tmp_path / 'base', '--adapter_from', tmp_path / 'adapter',
                     '--out_dir', 'out', '--max_iters', 1, '--learning_rate', 0, '--min_lr', 0, cwd=tmp_path)[1]
    assert f'{restored} adapters restored' in out, out[-2000:]
    assert (f'{fresh} adapters initialised fresh' in out) == bool(fresh), out[-2000:]
    saved = read_checkpoint(tmp_path / 'out')
    settings = {k: saved.training_state['adapter'][k] for k in ('attn_lora_rank', 'mlp_lora_rank', 'lora_alpha')}
    assert settings == {'attn_lora_rank': 4, 'mlp_lora_rank': 4 if 'c_fc' in targets else 0, 'lora_alpha': 16.0}
    ids = torch.randint(0, len(chars()), (2, 32), generator=torch.Generator().manual_seed(0))
    diff = (logits(saved.build_model(**settings)[0], ids) - logits(theirs, ids)).abs().max().item()
    assert diff <= TOL, f'train.py started from other logits than peft computes: {diff:.1e}'
    # a same-config resume of that run restores the adapters exactly: its first evaluation is the stored one
    flags = [f'--{k}={v}' for k, v in settings.items()]
    out = run_script('train.py', TINY_CONFIG, '--resume_from', 'out', '--max_iters', 3, *flags, cwd=tmp_path)[1]
    assert f'{restored + fresh} adapters restored' in out and 'initialised fresh' not in out, out[-2000:]
    now, stored = read_resume_check(out)
    assert abs(now - stored) <= TOL


def edit_config(directory, **changes):
    path = directory / 'adapter' / 'adapter_config.json'
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


@pytest.mark.parametrize('change, words', [
    (dict(use_dora=True), 'use_dora = True: DoRA'),
    (dict(use_rslora=True), 'use_rslora = True: rsLoRA'),
    (dict(bias='all'), "bias = 'all'"),
    (dict(alpha_pattern={'c_attn': 32}), 'alpha_pattern'),
    (dict(peft_type='IA3'), "peft_type is 'IA3'"),
    (dict(init_lora_weights='pissa'), "init_lora_weights = 'pissa': 'pissa' initialisation changes the base weights"),
    (dict(alora_invocation_tokens=[1, 2]), 'alora_invocation_tokens = [1, 2]: activated LoRA'),
    (dict(a_setting_from_a_newer_peft=True), 'a peft setting this toolkit does not know'),
])
def test_an_option_our_lora_cannot_compute_is_refused_by_name(tmp_path, change, words):
    peft_made(tmp_path, 64, ('c_attn',), steps=1)
    edit_config(tmp_path, **change)
    with pytest.raises(CheckpointError, match=re.escape(words)):
        read_peft(tmp_path / 'adapter', base=tmp_path / 'base')


@pytest.mark.parametrize('targets, words', [
    (('wte',), 'an embedding adapter without it'), # peft's embedding LoRA leaves the head as the base table
    (('lm_head',), 'an lm_head adapter of its own'),
])
def test_an_untied_embedding_or_head_adapter_is_refused(tmp_path, targets, words):
    peft_made(tmp_path, 64, targets, steps=1)
    with pytest.raises(CheckpointError, match=words):
        read_peft(tmp_path / 'adapter', base=tmp_path / 'base')


def test_an_adapter_for_another_base_or_module_is_refused(tmp_path):
    peft_made(tmp_path, 64, ('c_attn',), steps=1)
    weights = tmp_path / 'adapter' / 'adapter_model.safetensors'
    tensors = load_file(weights)
    extra = {k.replace('.h.1.', '.h.5.'): v.clone() for k, v in tensors.items() if '.h.1.' in k}
    save_file({**tensors, **extra}, weights)
    with pytest.raises(CheckpointError, match='adapts transformer.h.5.attn.c_attn, which the base model'):
        read_peft(tmp_path / 'adapter', base=tmp_path / 'base')
    save_file({k: v for k, v in tensors.items() if 'h.0.attn.c_attn.lora_B' not in k}, weights)
    with pytest.raises(CheckpointError, match='one of the two LoRA factors of transformer.h.0.attn.c_attn only'):
        read_peft(tmp_path / 'adapter', base=tmp_path / 'base')
    ln = {k.replace('attn.c_attn', 'ln_1'): v for k, v in tensors.items()}
    save_file(ln, weights)
    with pytest.raises(CheckpointError, match='ln_1.lora_A.weight, which this GPT has no place for'):
        read_peft(tmp_path / 'adapter', base=tmp_path / 'base')


def test_train_py_refuses_a_dora_adapter_in_one_paragraph_and_leaves_nothing(tmp_path):
    peft_made(tmp_path, len(chars()), ('c_attn',), steps=1)
    edit_config(tmp_path, use_dora=True)
    code, out = run_script('train.py', TINY_CONFIG, '--init_from', tmp_path / 'base', '--adapter_from',
                           tmp_path / 'adapter', '--out_dir', 'out', cwd=tmp_path, ok=False)
    assert code == 1 and 'Traceback' not in out and 'error: ' in out and 'use_dora = True' in out, out[-2000:]
    assert not (tmp_path / 'out').exists()
    # and without the base: where to put it
    edit_config(tmp_path, use_dora=False)
    code, out = run_script('train.py', TINY_CONFIG, '--adapter_from', tmp_path / 'adapter', cwd=tmp_path, ok=False)
    assert code == 1 and 'Traceback' not in out and '--init_from=BASE_DIR' in out, out[-2000:]


def test_a_bundle_without_adapters_is_not_exported_to_peft(tmp_path):
    lora_bundle(tmp_path / 'plain', {'token_kind': 'char', 'chars': chars()})
    code, out = run_script('convert_checkpoints.py', 'plain', '--to', 'peft', 'adapter', cwd=tmp_path, ok=False)
    assert code == 1 and 'Traceback' not in out and 'no LoRA adapters' in out and '--to hf' in out
    assert not (tmp_path / 'adapter').exists()


def hf_spec():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    tokenizer = Tokenizer(models.BPE(unk_token='[UNK]'))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator([TEXT] * 20, trainers.BpeTrainer(vocab_size=120, special_tokens=['[UNK]', '[SEP]']))
    tokenizer.post_processor = processors.TemplateProcessing(single='$A [SEP]', special_tokens=[('[SEP]', 1)])
    return {'token_kind': 'hf', 'tokenizer': json.loads(tokenizer.to_str())}


@pytest.mark.parametrize('kind', ['char', 'gpt2', 'hf'])
def test_the_hf_export_tokenizes_as_we_do_and_pipeline_generates(tmp_path, monkeypatch, kind):
    if kind == 'gpt2':
        if not GPT2_BPE:
            pytest.skip(needs_gpt2_bpe.kwargs['reason'])
        monkeypatch.setenv('TIKTOKEN_CACHE_DIR', str(TIKTOKEN_CACHE))
    from transformers import AutoTokenizer, pipeline
    spec = {'char': {'token_kind': 'char', 'chars': sorted(set(TEXT))}, 'gpt2': {'token_kind': 'gpt2'}, 'hf': hf_spec()}[kind]
    lora_bundle(tmp_path / 'bundle', spec)
    run_script('convert_checkpoints.py', 'bundle', '--to', 'hf', 'hf', cwd=tmp_path)
    ours = load_tokenizer(spec)
    theirs = AutoTokenizer.from_pretrained(tmp_path / 'hf')
    assert theirs(TEXT)['input_ids'] == ours.encode(TEXT)
    assert theirs.decode(ours.encode(TEXT)) == ours.decode(ours.encode(TEXT))
    back = read_checkpoint(tmp_path / 'hf')
    assert back.tokenizer == spec if kind != 'hf' else back.tokenizer['token_kind'] == 'hf'
    assert back.step == 5 and back.training_state['val_loss'] == 2.5 # what inspect_model.py shows
    generated = pipeline('text-generation', model=str(tmp_path / 'hf'))('Hello', max_new_tokens=8)[0]['generated_text']
    assert generated.startswith('Hello') and len(generated) > len('Hello')
    card = (tmp_path / 'hf' / 'README.md').read_text()
    assert 'Training steps: 5' in card and 'Val loss of these weights: 2.5000' in card and 'bundle' in card


def test_hugging_face_exports_import_neither_transformers_nor_peft(tmp_path):
    lora_bundle(tmp_path / 'lora', {'token_kind': 'char', 'chars': chars()}, **LORA)
    script = ('import sys; sys.path.insert(0, sys.argv[1]); from convert_checkpoints import export; '
              'export("lora", "hf", "hf"); export("lora", "peft", "peft"); '
              'from core.checkpoint import read_checkpoint; read_checkpoint("peft").build_model(); '
              'print(sorted(m for m in ("transformers", "peft") if m in sys.modules))')
    out = subprocess.run([sys.executable, '-c', script, str(REPO)], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip().splitlines()[-1] == '[]', out.stdout + out.stderr


def test_explicit_settings_win_over_the_adapters_with_a_note(tmp_path):
    peft_made(tmp_path, len(chars()), ('c_attn', 'c_proj', 'c_fc'), steps=1)
    out = run_script('train.py', TINY_CONFIG, '--init_from', tmp_path / 'base', '--adapter_from', tmp_path / 'adapter',
                     '--mlp_lora_rank', 0, '--out_dir', 'out', '--max_iters', 1, cwd=tmp_path)[1]
    assert 'note: mlp_lora_rank = 0 from this config is used (the peft adapter has 4)' in out, out[-2000:]
    adapter = read_checkpoint(tmp_path / 'out').training_state['adapter']
    assert (adapter['attn_lora_rank'], adapter['mlp_lora_rank']) == (4, 0)


def test_what_an_export_records_is_used_only_with_its_own_weights_and_base(tmp_path):
    import shutil
    from transformers import GPT2LMHeadModel
    lora_bundle(tmp_path / 'lora', {'token_kind': 'char', 'chars': chars()}, **LORA)
    run_script('convert_checkpoints.py', 'lora', '--to', 'peft', 'adapter', cwd=tmp_path)
    run_script('convert_checkpoints.py', 'lora', '--to', 'hf', 'hf', cwd=tmp_path)
    assert read_peft(tmp_path / 'adapter').step == 5 == read_checkpoint(tmp_path / 'hf').step
    # on another base (a copy elsewhere), the adapter's step and val loss do not apply
    shutil.copytree(tmp_path / 'adapter' / 'base', tmp_path / 'other')
    other = read_peft(tmp_path / 'adapter', base=tmp_path / 'other')
    assert other.step == 0 and 'val_loss' not in other.training_state and other.tokenizer is not None
    # weights saved again by transformers: our training_state.json no longer describes them
    model = GPT2LMHeadModel.from_pretrained(tmp_path / 'hf')
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight.mul_(2)
    model.save_pretrained(tmp_path / 'hf')
    again = read_checkpoint(tmp_path / 'hf')
    assert again.step == 0 and again.training_state.get('val_loss') is None
    assert any('is not the file this toolkit exported' in note for note in again.notes), again.notes
    # a truncated adapter file is named
    data = (tmp_path / 'adapter' / 'adapter_model.safetensors').read_bytes()
    (tmp_path / 'adapter' / 'adapter_model.safetensors').write_bytes(data[:len(data) // 2])
    with pytest.raises(CheckpointError, match='adapter_model.safetensors could not be read as a safetensors file'):
        read_peft(tmp_path / 'adapter')
