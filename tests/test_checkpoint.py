"""
The bundle format, legacy readers, CheckpointManager and the command-line tools (inspect, generate, convert).
"""

import hashlib
import json
import os
import pickle

import pytest
import torch

from model import GPT, GPTConfig
from core.checkpoint import (CheckpointError, CheckpointManager, read_checkpoint, read_meta_pkl, save_bundle)
from tests.helpers import make_nanogpt_checkpoint, run_script, run_train

CHARS = sorted(set('abcdefghij klmnop\n'))
TINY = dict(block_size=16, vocab_size=len(CHARS), n_layer=2, n_head=2, n_embd=16)


def trained_model(**overrides):
    torch.manual_seed(0)
    model = GPT(GPTConfig(**{**TINY, **overrides}))
    model.tokenizer_spec = {'token_kind': 'char', 'chars': CHARS}
    optimizer = model.configure_optimizers(0.1, 1e-2, (0.9, 0.99), 'cpu')
    ids = torch.randint(0, len(CHARS), (2, 16))
    model.fit([(ids, ids)] * 3, optimizer, max_iters=2, log_interval=0)
    return model.eval(), optimizer, ids


def sha(path):
    return hashlib.sha256(open(path, 'rb').read()).hexdigest()


def test_bundle_layout_and_contents(tmp_path):
    model, optimizer, ids = trained_model(attn_lora_rank=2)
    save_bundle(tmp_path, model, 2, optimizer, val_loss=1.5)
    assert sorted(os.listdir(tmp_path)) == ['adapter.pt', 'config.json', 'manifest.json', 'model.pt', 'optimizer.pt',
                                            'tokenizer.json', 'training_state.json']
    weights = torch.load(tmp_path / 'model.pt', weights_only=True)
    assert list(weights) == list(GPT(GPTConfig(**TINY)).state_dict())  # standard keys only
    # the tied embedding / head is one tensor on disk
    assert weights['lm_head.weight'].untyped_storage().data_ptr() == weights['transformer.wte.weight'].untyped_storage().data_ptr()
    config = json.loads((tmp_path / 'config.json').read_text())
    assert config['format_version'] == 1 and config['attn_lora_rank'] == 0 and config['n_embd'] == 16
    state = json.loads((tmp_path / 'training_state.json').read_text())
    assert state['step'] == 2 and state['val_loss'] == 1.5 and state['adapter']['attn_lora_rank'] == 2
    assert json.loads((tmp_path / 'tokenizer.json').read_text()) == {'token_kind': 'char', 'chars': CHARS}
    assert set(torch.load(tmp_path / 'adapter.pt', weights_only=True)) == {
        f'transformer.h.{i}.attn.{m}.lora_{f}.weight' for i in range(2) for m in ('c_attn', 'c_proj') for f in 'AB'}
    # a deploy-only save of the same directory leaves no stale optimizer or adapter file behind
    deployed = read_checkpoint(tmp_path).build_model()[0]
    save_bundle(tmp_path, deployed, 2)
    assert not (tmp_path / 'optimizer.pt').exists() and not (tmp_path / 'adapter.pt').exists()
    with torch.no_grad():
        assert (deployed(ids, ids)[0] - model(ids, ids)[0]).abs().max() < 1e-5


def test_config_json_grows_and_shrinks_safely(tmp_path):
    model, _, ids = trained_model()
    save_bundle(tmp_path, model, 2)
    config = json.loads((tmp_path / 'config.json').read_text())
    # fields a newer (or older, seed-style) writer added are ignored with a note; hand edits of them are safe
    config.update(batch_size=32, device='cuda', a_future_field=[1, 2])
    config['dropout'] = 0.2
    del config['lora_dropout']  # a field an older writer did not know: it takes its default
    (tmp_path / 'config.json').write_text(json.dumps(config))
    ck = read_checkpoint(tmp_path)
    assert any('ignoring fields that are not part of GPTConfig: a_future_field, batch_size, device' in n for n in ck.notes)
    assert ck.config.dropout == 0.2 and ck.config.lora_dropout == 0.0
    assert any('config.json was edited after it was saved' in note for note in ck.notes)  # said, not refused
    loaded = ck.build_model()[0].eval()
    with torch.no_grad():
        assert torch.equal(loaded(ids, ids)[0], model(ids, ids)[0])
    config['n_layer'] = '2'
    (tmp_path / 'config.json').write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"config.json: field 'n_layer' should be a int, found '2'"):
        read_checkpoint(tmp_path)


def test_checkpoint_manager_fresh_then_resume(tmp_path):
    manager = CheckpointManager('dante', root=str(tmp_path))
    config = GPTConfig(block_size=16, n_layer=2, n_head=2, n_embd=16)
    model, optimizer, start = manager.initialize_for_training(config, 'char', 'hello world', learning_rate=1e-3)
    assert start == 0 and model.config.vocab_size == len(set('hello world'))
    assert manager.checkpoint_dir == os.path.join(str(tmp_path), 'dante')
    ids = torch.tensor([[0, 1, 2, 3]])
    model.fit([(ids, ids)] * 4, optimizer, max_iters=3, checkpoint_dir=manager.checkpoint_dir, log_interval=0)
    model2, optimizer2, start = manager.initialize_for_training(config, 'char', 'hello world', learning_rate=1e-3)
    assert start == 3 and len(optimizer2.state) == len(list(model2.parameters()))
    inference = CheckpointManager.load_for_inference('dante', root=str(tmp_path))
    assert not inference.training and inference.tokenizer_spec['chars'] == sorted(set('hello world'))
    model.eval()
    with torch.no_grad():
        assert torch.equal(inference(ids, ids)[0], model(ids, ids)[0])
    assert manager.get_path('model.pt') == os.path.join(manager.checkpoint_dir, 'model.pt')


def test_legacy_seed_api(tmp_path):
    path, model, ids = make_nanogpt_checkpoint(tmp_path, CHARS)
    loaded, tokenizer, step, optimizer_state = GPT.load_legacy(str(path))
    assert step == 3 and tokenizer == {'token_kind': 'char', 'chars': CHARS}
    assert set(optimizer_state['state']) == {n for n, _ in loaded.named_parameters()}
    loaded.save_checkpoint_bundle(tmp_path / 'bundle', step=step, optimizer_state=optimizer_state)
    model.eval()
    with torch.no_grad():
        reread = CheckpointManager.load_for_inference(str(tmp_path / 'bundle'))
        assert (reread(ids, ids)[0] - model(ids, ids)[0]).abs().max() < 1e-5
    saved = torch.load(tmp_path / 'bundle' / 'optimizer.pt', weights_only=True)
    assert torch.equal(saved['state']['transformer.wpe.weight']['exp_avg'],
                       optimizer_state['state']['transformer.wpe.weight']['exp_avg'])
    loaded.save(tmp_path / 'weights-only')
    assert sorted(os.listdir(tmp_path / 'weights-only')) == ['manifest.json', 'model.pt']


def test_bare_state_dict_needs_its_head_count(tmp_path):
    torch.save(GPT(GPTConfig(**TINY)).state_dict(), tmp_path / 'weights.pt')
    with pytest.raises(CheckpointError, match='n_head'):
        read_checkpoint(tmp_path / 'weights.pt')


def test_pickled_objects_are_refused(tmp_path):
    marker = tmp_path / 'pwned'

    class Exploit:
        def __reduce__(self):
            return (os.system, (f'touch {marker}',))

    torch.save({'model': {}, 'config': Exploit()}, tmp_path / 'ckpt.pt')
    with pytest.raises(CheckpointError, match='could run code'):
        read_checkpoint(tmp_path / 'ckpt.pt')
    with open(tmp_path / 'meta.pkl', 'wb') as f:
        pickle.dump({'itos': Exploit()}, f)
    with pytest.raises(CheckpointError, match='refusing to load'):
        read_meta_pkl(tmp_path / 'meta.pkl')
    assert not marker.exists()


def test_inspect_reads_no_optimizer_and_names_damaged_weights(tmp_path):
    model, optimizer, _ = trained_model()
    save_bundle(tmp_path / 'm', model, 2, optimizer, best_val_loss=1.25, val_loss=1.25)
    for name in ('optimizer.pt', 'model.pt'): # same-size garbage: passes the size check, would fail any read
        path = tmp_path / 'm' / name
        path.write_bytes(b'x' * path.stat().st_size)
    code, out = run_script('inspect_model.py', '--model_name', 'm', '--root', tmp_path, cwd=tmp_path)
    assert code == 0
    assert '=== FORMAT ===\nNew JSON-based format' in out and 'n_layer:2, n_head:2, n_embd:16' in out
    assert f'vocab     : {len(CHARS)} characters' in out and 'Last recorded training step: 2' in out
    assert 'Best val loss: 1.2500' in out and 'Trained with adapters: none (standard)' in out
    assert 'Note: the config above was not confirmed by the weights' in out and 'model.pt does not match its checksum' in out
    code, out = run_script('inspect_model.py', cwd=tmp_path, ok=False)
    assert code == 1 and 'exactly one of --model_name' in out and 'Traceback' not in out


def test_generate_legacy_checkpoint_by_model_name(tmp_path):
    path, _, _ = make_nanogpt_checkpoint(tmp_path, CHARS)
    (tmp_path / 'checkpoints' / 'dante').mkdir(parents=True)
    os.replace(path, tmp_path / 'checkpoints' / 'dante' / 'final.pt')
    code, out = run_script('generate.py', '--model_name', 'dante', '--legacy_checkpoint', 'final.pt', '--start', 'abc',
                           '--num_samples', 2, '--max_new_tokens', 10, '--seed', 1, cwd=tmp_path)
    samples = [s.strip() for s in out.split('---------------')[:2]]
    assert all(s.startswith('abc') and len(s) == 13 and set(s) <= set(CHARS) for s in samples), out
    code, again = run_script('generate.py', '--model_name', 'dante', '--legacy_checkpoint', 'final.pt', '--start', 'abc',
                             '--num_samples', 2, '--max_new_tokens', 10, '--seed', 1, cwd=tmp_path)
    assert again == out  # seeded
    code, out = run_script('generate.py', '--model_name', 'dante', '--legacy_checkpoint', 'final.pt', '--start', 'xyz',
                           cwd=tmp_path, ok=False)
    assert code == 1 and "'x' is not in this char vocabulary" in out and 'Traceback' not in out


def test_generate_refuses_a_tokenizer_larger_than_the_model(tmp_path):
    model, _, _ = trained_model()
    model.tokenizer_spec = {'token_kind': 'char', 'chars': CHARS + ['x', 'y']}
    save_bundle(tmp_path / 'm', model, 2)
    code, out = run_script('generate.py', '--checkpoint', tmp_path / 'm', cwd=tmp_path, ok=False)
    assert code == 1 and f'produces {len(CHARS) + 2} ids but the model has {len(CHARS)} embedding rows' in out


def test_convert_keeps_original_optimizer_and_verifies(tmp_path):
    path, model, ids = make_nanogpt_checkpoint(tmp_path, CHARS)
    (tmp_path / 'checkpoints' / 'shakespeare').mkdir(parents=True)
    legacy = tmp_path / 'checkpoints' / 'shakespeare' / 'latest.pt'
    os.replace(path, legacy)
    before = sha(legacy)
    code, out = run_script('convert_checkpoints.py', cwd=tmp_path)  # every model under checkpoints/
    assert 'latest.pt -> checkpoints/shakespeare: step 3, optimizer state kept' in out and 'original kept' in out
    assert float(out.split('max |logits difference| ')[1].split(';')[0]) <= 1e-5
    assert sha(legacy) == before
    bundle = read_checkpoint(tmp_path / 'checkpoints' / 'shakespeare')
    assert bundle.kind == 'bundle' and bundle.step == 3 and bundle.tokenizer['chars'] == CHARS
    assert len(bundle.optimizer_state()['state']) == len(list(model.parameters()))
    code, out = run_script('convert_checkpoints.py', legacy, cwd=tmp_path, ok=False)
    assert code == 1 and 'already holds a bundle' in out
    code, out = run_script('convert_checkpoints.py', cwd=tmp_path)
    assert 'nothing to convert' in out


def test_train_refuses_data_with_another_vocabulary(tmp_path):
    (tmp_path / 'text.txt').write_text('only these letters\n' * 300)
    run_script('data/prepare.py', '--dataset', 'letters', '--input', 'text.txt', '--out_dir', 'data/letters', cwd=tmp_path)
    run_train(tmp_path, '--out_dir', 'std', '--max_iters', 2)  # the repo's pydocs_char corpus
    code, out = run_train(tmp_path, '--resume_from', 'std', '--dataset', 'letters', ok=False)
    assert code == 1 and 'another tokenizer' in out and 'Traceback' not in out


def test_fast_load_is_tied_trainable_and_exact(tmp_path):
    """ build_model: meta-device model + mmap'd weights assigned in place; the tie and the trainable set hold """
    model, optimizer, ids = trained_model(embedding_mode='lora', embedding_rank=2, attn_lora_rank=2)
    save_bundle(tmp_path, model, 2, optimizer)
    for adapters in ({}, dict(embedding_mode='lora', embedding_rank=2, attn_lora_rank=2)):
        loaded = read_checkpoint(tmp_path).build_model(**adapters)[0].eval()
        assert not any(p.is_meta for p in loaded.parameters())
        assert loaded.lm_head.weight is loaded.token_table().weight  # one Parameter, as nanoGPT ties them
        assert [n for n, p in loaded.named_parameters() if p.requires_grad] == \
               [n for n, p in GPT(loaded.config).named_parameters() if p.requires_grad]
        with torch.no_grad():
            assert (loaded(ids, ids)[0] - model(ids, ids)[0]).abs().max() < 1e-5
    # the loaded (standard) model trains, and its tied head moves with the embedding
    loaded = read_checkpoint(tmp_path).build_model()[0]
    opt = loaded.configure_optimizers(0.0, 1e-2, (0.9, 0.99), 'cpu')
    before = loaded.lm_head.weight.detach().clone()
    loaded(ids, ids)[1].backward()
    opt.step()
    assert not torch.equal(before, loaded.lm_head.weight) and torch.equal(loaded.lm_head.weight, loaded.transformer.wte.weight)
