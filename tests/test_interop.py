"""
Hugging Face GPT-2 directories both ways, compared with transformers' own GPT2LMHeadModel, and the nanoGPT ckpt.pt
export, checked the way nanoGPT's train.py resumes it. Against transformers (two implementations, other kernels) the
logits agree within float32 roundings at their magnitude, and in float64 within float64 roundings, which only an exact
conversion meets (tests/numerics.py); against our own GPT (the same code) they are equal.
"""

import dataclasses

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from model import GPT, GPTConfig
from core.checkpoint import read_checkpoint, save_bundle
from core.nanogpt import NANOGPT_ARGS
from tests.helpers import run_script, run_train
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
    assert set(ckpt) == {'model', 'optimizer', 'model_args', 'iter_num', 'best_val_loss', 'config'}
    assert tuple(ckpt['model_args']) == NANOGPT_ARGS and ckpt['iter_num'] == 3 and ckpt['best_val_loss'] == 2.5
    # what nanoGPT's train.py does on --init_from=resume (its GPT has our keys): build, load strictly, load the optimizer
    resumed = GPT(GPTConfig(**ckpt['model_args']))
    resumed.load_state_dict(ckpt['model'], strict=True)
    opt = resumed.configure_optimizers(0.1, 1e-2, (0.9, 0.99), 'cpu')
    opt.load_state_dict(ckpt['optimizer'])
    assert torch.equal(opt.state[resumed.transformer.h[1].mlp.c_fc.weight]['exp_avg'],
                       optimizer.state[model.transformer.h[1].mlp.c_fc.weight]['exp_avg'])
    with torch.no_grad():
        assert torch.equal(resumed.eval()(ids, ids)[0], model(ids, ids)[0]) # the same weights in the same GPT


def test_export_refuses_what_the_format_cannot_hold(tmp_path):
    model, optimizer, _ = trained(bias=False)
    save_bundle(tmp_path / 'b', model, 3, optimizer)
    code, out = run_script('convert_checkpoints.py', tmp_path / 'b', '--to', 'hf', tmp_path / 'hf', cwd=tmp_path, ok=False)
    assert code == 1 and 'no biases' in out and 'Traceback' not in out
    model, optimizer, _ = trained(n_hidden=48)
    save_bundle(tmp_path / 'c', model, 3, optimizer)
    code, out = run_script('convert_checkpoints.py', tmp_path / 'c', '--to', 'nanogpt', tmp_path / 'x.pt', cwd=tmp_path, ok=False)
    assert code == 1 and 'n_hidden' in out
