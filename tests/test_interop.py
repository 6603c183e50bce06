"""
Hugging Face GPT-2 directories both ways, compared with transformers' own GPT2LMHeadModel, and the nanoGPT ckpt.pt
export, checked the way nanoGPT's train.py resumes it. Against transformers (two implementations, other kernels) the
logits agree within float32 roundings at their magnitude, and in float64 within float64 roundings, which only an exact
conversion meets (tests/numerics.py); against our own GPT (the same code) they are equal.
"""

import dataclasses
import json
import pickle

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from model import GPT, GPTConfig
from core.checkpoint import read_checkpoint, save_bundle
from core.nanogpt import NANOGPT_ARGS
from tests.helpers import needs_gpt2_bpe, run_script, run_train
from tests.numerics import assert_same_function, in_float64


def trained(**overrides):
    torch.manual_seed(0)
    config = {**dict(block_size=32, vocab_size=96, n_layer=2, n_head=2, n_embd=32, bias=True), **overrides}
    model = GPT(GPTConfig(**config))
    model.tokenizer_spec = {'token_kind': 'char', 'chars': [chr(32 + i) for i in range(95)] + ['\n']}
    optimizer = model.configure_optimizers(0.1, 1e-2, (0.9, 0.99), 'cpu')
    ids = torch.randint(0, 96, (2, 32))
    model.fit([(ids, ids)] * 4, optimizer, max_iters=3, log_interval=0)
    return model.eval(), optimizer, ids


@pytest.mark.parametrize('activation', ['gelu', 'gelu_tanh'])
def test_export_to_hugging_face_gives_our_logits(tmp_path, activation):
    model, optimizer, ids = trained(activation=activation, attn_lora_rank=4) # the LoRA update is merged on export
    with torch.no_grad():
        model.transformer.h[0].attn.c_attn.lora_B.weight.normal_()
    save_bundle(tmp_path / 'bundle', model, 3, optimizer)
    code, out = run_script('convert_checkpoints.py', tmp_path / 'bundle', '--to', 'hf', tmp_path / 'hf', cwd=tmp_path)
    assert 'max |logits difference| read back' in out
    hf = GPT2LMHeadModel.from_pretrained(tmp_path / 'hf').eval()
    assert hf.lm_head.weight.data_ptr() == hf.transformer.wte.weight.data_ptr() # tied, as transformers expects
    with torch.no_grad():
        assert_same_function(hf(ids).logits, model(ids, ids)[0])
        # in float64 against the weights the export holds: the merge rounds them once to float32, as it must
        merged = GPT(dataclasses.replace(model.config, attn_lora_rank=0))
        merged.load_state_dict(model.get_merged_state_dict(), strict=True)
        hf, merged = in_float64(hf, merged)
        assert_same_function(hf(ids).logits, merged(ids, ids)[0])


@pytest.mark.parametrize('serialization', ['safetensors', 'bin'])
def test_import_hugging_face_directory_gives_transformers_logits(tmp_path, serialization):
    torch.manual_seed(1)
    config = GPT2Config(vocab_size=50257, n_positions=64, n_embd=32, n_layer=2, n_head=2) # GPT-2's own gelu_new
    hf = GPT2LMHeadModel(config).eval()
    hf.save_pretrained(tmp_path / 'hf')
    if serialization == 'bin': # what older transformers wrote: pytorch_model.bin, with the causal masks as buffers
        from safetensors.torch import load_file
        sd = load_file(tmp_path / 'hf' / 'model.safetensors')
        sd['transformer.h.0.attn.bias'] = torch.ones(1, 1, 64, 64).tril()
        torch.save(sd, tmp_path / 'hf' / 'pytorch_model.bin')
        (tmp_path / 'hf' / 'model.safetensors').unlink()
    ck = read_checkpoint(tmp_path / 'hf')
    assert ck.kind == 'hf' and ck.config.vocab_size == 50257 and ck.config.activation == 'gelu_tanh'
    assert ck.tokenizer == {'token_kind': 'gpt2'}
    ours = ck.build_model()[0].eval()
    ids = torch.randint(0, 50257, (2, 64))
    with torch.no_grad():
        assert_same_function(ours(ids, ids)[0], hf(ids).logits)
        hf, ours = in_float64(hf, ours)
        assert_same_function(ours(ids, ids)[0], hf(ids).logits)


@needs_gpt2_bpe
def test_train_initialises_from_a_hugging_face_directory(tmp_path):
    torch.manual_seed(1)
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=50257, n_positions=32, n_embd=32, n_layer=2, n_head=2)).eval()
    hf.save_pretrained(tmp_path / 'hf')
    run_script('data/prepare.py', '--dataset', 'pydocs', '--out_dir', 'data/pydocs', cwd=tmp_path) # GPT-2 BPE
    # learning rate 0: every save holds exactly the weights the run started from, which init_from loaded
    out = run_train(tmp_path, '--dataset', 'pydocs', '--init_from', tmp_path / 'hf', '--out_dir', 'ft', '--max_iters', 4,
                    '--attn_lora_rank', 2, '--learning_rate', 0.0, '--decay_lr', False)
    assert 'loaded hf checkpoint' in out and 'adapters initialised fresh' in out
    bundle = read_checkpoint(tmp_path / 'ft')
    assert bundle.step == 4 and bundle.config.vocab_size == 50257 and bundle.config.activation == 'gelu_tanh'
    ours = bundle.build_model()[0].eval()
    ids = torch.randint(0, 50257, (2, 32))
    with torch.no_grad():
        assert_same_function(ours(ids, ids)[0], hf(ids).logits)
        hf, ours = in_float64(hf, ours)
        assert_same_function(ours(ids, ids)[0], hf(ids).logits)


def test_export_to_nanogpt_resumes_like_nanogpt(tmp_path):
    model, optimizer, ids = trained(bias=False)
    save_bundle(tmp_path / 'bundle', model, 3, optimizer, best_val_loss=2.5)
    code, out = run_script('convert_checkpoints.py', tmp_path / 'bundle', '--to', 'nanogpt', tmp_path / 'ckpt.pt', cwd=tmp_path)
    ckpt = torch.load(tmp_path / 'ckpt.pt', weights_only=True)
    # nanoGPT's six keys, and our probe (its scripts ignore keys they do not read)
    assert set(ckpt) == {'model', 'optimizer', 'model_args', 'iter_num', 'best_val_loss', 'config', 'probe'}
    assert tuple(ckpt['model_args']) == NANOGPT_ARGS and ckpt['iter_num'] == 3 and ckpt['best_val_loss'] == 2.5
    # what nanoGPT's train.py does on --init_from=resume (its GPT has our keys): build, load strictly, load the optimizer
    resumed = GPT(GPTConfig(**ckpt['model_args']))
    resumed.load_state_dict(ckpt['model'], strict=True)
    opt = resumed.configure_optimizers(0.1, 1e-2, (0.9, 0.99), 'cpu')
    opt.load_state_dict(ckpt['optimizer'])
    for name in ('h.1.mlp.c_fc.weight', 'ln_f.weight'): # one of each group: decayed matrices, the rest
        ours, theirs = model.transformer.get_parameter(name), resumed.transformer.get_parameter(name)
        assert torch.equal(opt.state[theirs]['exp_avg'], optimizer.state[ours]['exp_avg']), name
    assert read_checkpoint(tmp_path / 'ckpt.pt').step == 3 # and we read its iter_num back
    with torch.no_grad():
        assert torch.equal(resumed.eval()(ids, ids)[0], model(ids, ids)[0]) # the same weights in the same GPT
    # nanoGPT's train.py takes the groups' settings from the file: decay on the matrices only, its lr and betas
    groups = ckpt['optimizer']['param_groups']
    assert [g['weight_decay'] for g in groups] == [0.1, 0.0] and [len(g['params']) for g in groups] == [
        len(g['params']) for g in resumed.configure_optimizers(0.1, 6e-4, (0.9, 0.95), 'cpu').param_groups]
    assert all(g['lr'] == 6e-4 and g['betas'] == (0.9, 0.95) for g in groups)
    # and its sample.py decodes with the meta.pkl beside it: itos / stoi of our char vocabulary
    with open(tmp_path / 'meta.pkl', 'rb') as f:
        meta = pickle.load(f)
    chars = model.tokenizer_spec['chars']
    assert meta == {'vocab_size': 96, 'itos': dict(enumerate(chars)), 'stoi': {c: i for i, c in enumerate(chars)}}


def test_a_model_without_biases_goes_to_hugging_face_with_zero_biases_and_comes_back_without(tmp_path):
    model, optimizer, ids = trained(bias=False) # nanoGPT's default
    save_bundle(tmp_path / 'b', model, 3, optimizer)
    run_script('convert_checkpoints.py', tmp_path / 'b', '--to', 'hf', tmp_path / 'hf', cwd=tmp_path)
    hf = GPT2LMHeadModel.from_pretrained(tmp_path / 'hf').eval()
    assert hf.transformer.h[1].mlp.c_fc.bias.shape == (4 * 32,) and not hf.transformer.ln_f.bias.any()
    with torch.no_grad():
        ours, theirs = model(ids, ids)[0], hf(ids).logits
        assert (ours - theirs).abs().max().item() <= 1e-5
        assert_same_function(theirs, ours)
    back = read_checkpoint(tmp_path / 'hf')
    assert back.config.bias is False and back.config.n_head == 2
    assert set(back.weights()) == set(model.state_dict()) # no bias keys: loads strictly into the bias=False GPT
    with torch.no_grad():
        assert torch.equal(back.build_model()[0].eval()(ids, ids)[0], ours)


def test_a_hugging_face_model_with_a_nonzero_bias_reads_back_with_biases(tmp_path):
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, vocab_size=96, n_layer=2, n_head=2, n_embd=32, bias=True)) # biases start at 0
    with torch.no_grad():
        model.transformer.h[0].ln_2.bias[3] = 0.5 # one bias is enough to need them all
    save_bundle(tmp_path / 'b', model, 3)
    run_script('convert_checkpoints.py', tmp_path / 'b', '--to', 'hf', tmp_path / 'hf', cwd=tmp_path)
    back = read_checkpoint(tmp_path / 'hf')
    assert back.config.bias is True and back.weights()['transformer.h.0.ln_2.bias'][3] == 0.5


def test_the_exported_config_json_holds_every_field_transformers_reads(tmp_path):
    model, optimizer, _ = trained(n_hidden=48, dropout=0.1, activation='gelu')
    save_bundle(tmp_path / 'b', model, 3, optimizer)
    run_script('convert_checkpoints.py', tmp_path / 'b', '--to', 'hf', tmp_path / 'hf', cwd=tmp_path)
    config = json.loads((tmp_path / 'hf' / 'config.json').read_text())
    assert {k: config[k] for k in ('model_type', 'vocab_size', 'n_positions', 'n_ctx', 'n_embd', 'n_layer', 'n_head',
                                   'n_inner', 'activation_function', 'resid_pdrop', 'embd_pdrop', 'attn_pdrop',
                                   'layer_norm_epsilon', 'tie_word_embeddings')} == dict(
        model_type='gpt2', vocab_size=96, n_positions=32, n_ctx=32, n_embd=32, n_layer=2, n_head=2, n_inner=48,
        activation_function='gelu', resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1, layer_norm_epsilon=1e-5,
        tie_word_embeddings=True)
    generation = json.loads((tmp_path / 'hf' / 'generation_config.json').read_text())
    assert (generation['do_sample'], generation['temperature'], generation['top_k']) == (True, 0.8, 200) # nanoGPT's
    back = read_checkpoint(tmp_path / 'hf').config
    assert (back.n_hidden, back.activation, back.dropout, back.block_size) == (48, 'gelu', 0.1, 32)


def test_export_refuses_what_the_format_cannot_hold(tmp_path):
    model, optimizer, _ = trained(n_hidden=48)
    save_bundle(tmp_path / 'c', model, 3, optimizer)
    code, out = run_script('convert_checkpoints.py', tmp_path / 'c', '--to', 'nanogpt', tmp_path / 'x.pt', cwd=tmp_path, ok=False)
    assert code == 1 and 'n_hidden' in out and 'Traceback' not in out
