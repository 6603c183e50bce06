"""
The bundle format, legacy readers, CheckpointManager and the command-line tools (inspect, generate, convert);
the optimizer state by name and the random state; the training helpers train.py and GPT.fit share.
"""

import copy
import hashlib
import json
import os
import pickle

import pytest
import torch

from model import GPT, CheckpointMismatchError, GPTConfig
from core.bundle import positional_names
from core.checkpoint import (KINDS, CheckpointError, CheckpointManager, apply_optimizer_state, named_optimizer_state,
                             read_checkpoint, rng_state, save_bundle, set_rng_state)
from core.nanogpt import read_meta_pkl
from core.training import estimate_loss, get_lr, save_checkpoint, set_lr, train_step
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


def test_the_lora_merge_overlapped_with_the_write_gives_the_same_bytes(tmp_path):
    # save_bundle merges the LoRA weights while model.pt is being written: the file must be the one torch.save
    # writes of the merges done first (checked with enough weights that the writer really waits for some)
    from core.commit import save_tensors
    model, optimizer, _ = trained_model(n_layer=4, n_embd=64, attn_lora_rank=4, mlp_lora_rank=4, embedding_mode='lora',
                                        embedding_rank=4)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if 'lora_B' in name:
                p.normal_() # a real update, so an unmerged or half-merged weight would show
    save_bundle(tmp_path / 'overlapped', model, 2, optimizer)
    save_tensors(tmp_path / 'first.pt', model.get_merged_state_dict())
    assert sha(tmp_path / 'overlapped' / 'model.pt') == sha(tmp_path / 'first.pt')


def test_a_diverged_adapter_fails_the_save_and_keeps_the_last_checkpoint(tmp_path):
    model, optimizer, _ = trained_model(attn_lora_rank=2)
    save_bundle(tmp_path / 'run', model, 2, optimizer)
    before = {p.name: sha(p) for p in (tmp_path / 'run').iterdir()}
    with torch.no_grad():
        model.transformer.h[1].attn.c_proj.lora_B.weight[0, 0] = float('nan')
    with pytest.raises(CheckpointMismatchError, match='NaN/inf'):
        save_bundle(tmp_path / 'run', model, 3, optimizer)
    assert {p.name: sha(p) for p in (tmp_path / 'run').iterdir()} == before # and nothing left beside it
    assert sorted(p.name for p in tmp_path.iterdir()) == ['run']


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


def test_a_missing_checkpoint_names_every_kind_and_the_near_miss(tmp_path):
    (tmp_path / 'out-fsdp').mkdir()
    with pytest.raises(CheckpointError) as error:
        read_checkpoint(tmp_path / 'out-fsdpp')
    assert 'nothing is there (did you mean' in str(error.value) and str(tmp_path / 'out-fsdp') + '?' in str(error.value)
    assert 'a sharded checkpoint (config.json + .metadata + shards)' in str(error.value) # as for an empty directory
    assert all(kind.looks and kind.looks in str(error.value) for kind in KINDS.values() if kind.read) # each kind read
    with pytest.raises(CheckpointError, match=r'a sharded checkpoint \(config.json \+ .metadata \+ shards\)'):
        read_checkpoint(tmp_path / 'out-fsdp')


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
    code, same = run_script('inspect_model.py', tmp_path / 'm', cwd=tmp_path) # by its path, as convert takes it
    assert code == 0 and same == out
    code, out = run_script('inspect_model.py', cwd=tmp_path, ok=False)
    assert code == 1 and 'exactly one of PATH, --checkpoint PATH or --model_name NAME' in out and 'Traceback' not in out


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


# -----------------------------------------------------------------------------
# optimizer state by name, random state, adapters on load

def test_optimizer_state_is_named_by_configure_optimizers_order():
    model, optimizer, _ = trained_model()
    by_object = named_optimizer_state(model, optimizer)
    by_position = named_optimizer_state(model, optimizer.state_dict()) # nanoGPT's ckpt.pt holds this
    for named in (by_object, by_position):
        assert [g['weight_decay'] for g in named['param_groups']] == [0.1, 0.0]
        assert [len(g['params']) for g in named['param_groups']] == [len(g) for g in model.optimizer_groups()]
        for name, p in model.named_parameters():
            assert torch.equal(named['state'][name]['exp_avg'], optimizer.state[p]['exp_avg']), name
    assert by_object['param_groups'] == by_position['param_groups']
    assert [g['params'] for g in by_object['param_groups']] == [[n for n, _ in g] for g in model.optimizer_groups()]
    # a positional state that does not fit this model's groups or shapes is refused, never named wrongly
    for change in (dict(n_layer=3), dict(n_embd=32)):
        other = GPT(GPTConfig(**{**TINY, **change}))
        assert positional_names(other, optimizer.state_dict()) is None
        with pytest.raises(CheckpointError, match='configure_optimizers'):
            named_optimizer_state(other, optimizer.state_dict())


def test_optimizer_state_carried_over_where_name_and_shape_match():
    model, optimizer, ids = trained_model()
    named = named_optimizer_state(model, optimizer)
    other = GPT(GPTConfig(**{**TINY, 'vocab_size': len(CHARS) + 3})) # the token table changed shape, nothing else
    opt = other.configure_optimizers(0.1, 5e-3, (0.9, 0.95), 'cpu')
    kept, fresh = apply_optimizer_state(other, opt, named)
    params = dict(other.named_parameters())
    assert (kept, fresh) == (len(params) - 1, 1)
    assert params['transformer.wte.weight'] not in opt.state # fresh: a state of another shape is never applied
    for name, p in params.items():
        if name != 'transformer.wte.weight':
            assert torch.equal(opt.state[p]['exp_avg'], named['state'][name]['exp_avg']), name
            assert torch.equal(opt.state[p]['step'], named['state'][name]['step']), name
    assert [(g['lr'], g['betas']) for g in opt.param_groups] == [(5e-3, (0.9, 0.95))] * 2 # this run's hyperparameters
    other(ids, ids)[1].backward()
    opt.step() # the state fits the parameters it was given to
    assert apply_optimizer_state(other, opt, None) == (0, len(params)) # no state: everything fresh


def test_optimizer_state_of_adapter_layers_goes_by_standard_names():
    model, optimizer, _ = trained_model(attn_lora_rank=2, lora_train_norms_biases=True)
    named = named_optimizer_state(model, optimizer)
    assert 'transformer.h.0.attn.c_attn.bias' in named['state'] and not any('main_weight' in k for k in named['state'])
    # the norms and biases the LoRA run trained carry over into a standard model, the factors have no place there
    standard = GPT(GPTConfig(**TINY))
    kept, fresh = apply_optimizer_state(standard, standard.configure_optimizers(0.1, 1e-3, (0.9, 0.99), 'cpu'), named)
    assert kept == sum(1 for k in named['state'] if 'lora_' not in k) == 2 * 8 + 2
    assert fresh == 2 + 2 * 4 # wte, wpe and the matrices, which the LoRA run kept frozen
    # and into the same adapters, everything, biases found under their standard names
    lora = GPT(GPTConfig(**TINY, attn_lora_rank=2, lora_train_norms_biases=True))
    opt = lora.configure_optimizers(0.1, 1e-3, (0.9, 0.99), 'cpu')
    assert apply_optimizer_state(lora, opt, named) == (len(named['state']), 0)
    bias = lora.transformer.h[0].attn.c_attn.main_weight.bias
    assert torch.equal(opt.state[bias]['exp_avg'], named['state']['transformer.h.0.attn.c_attn.bias']['exp_avg'])


def test_legacy_lora_file_is_merged_with_its_alpha(tmp_path):
    model, _, ids = trained_model(attn_lora_rank=2, lora_alpha=8.0)
    config = {k: getattr(model.config, k) for k in ('n_layer', 'n_head', 'n_embd', 'block_size', 'bias', 'vocab_size',
                                                    'attn_lora_rank', 'lora_alpha')}
    torch.save({'model': model.state_dict(), 'step': 2, 'tokenizer': model.tokenizer_spec, 'config': config},
               tmp_path / 'latest.pt') # an older single file: the LoRA-shaped state dict, factors and all
    loaded, report = read_checkpoint(tmp_path / 'latest.pt').build_model()
    assert len(report['merged_source_lora']) == 4
    with torch.no_grad():
        assert (loaded.eval()(ids, ids)[0] - model(ids, ids)[0]).abs().max() < 1e-5


def test_rng_state_round_trips_through_json():
    torch.manual_seed(3)
    state = json.loads(json.dumps(rng_state())) # as training_state.json stores it
    drawn = torch.rand(5)
    torch.rand(7)
    set_rng_state(state)
    assert torch.equal(torch.rand(5), drawn)
    if not torch.cuda.is_available(): # a GPU run's state (it has 'cuda' entries) resumes on a CPU: those are skipped
        set_rng_state({**state, 'cuda': [state['torch']]})
        assert torch.equal(torch.rand(5), drawn)


def test_same_adapters_are_restored_other_alpha_starts_fresh(tmp_path):
    model, optimizer, ids = trained_model(attn_lora_rank=2, lora_alpha=8.0)
    save_bundle(tmp_path, model, 2, optimizer)
    ck = read_checkpoint(tmp_path)
    same, report = ck.build_model(attn_lora_rank=2, lora_alpha=8.0)
    assert len(report['restored_lora']) == 4 and report['fresh_lora'] == []
    for k, v in model.state_dict().items():
        if 'lora_' in k:
            assert torch.equal(same.state_dict()[k], v), k # the factors the run trained, to continue it exactly
    # another alpha: the saved factors would mean another update, so the adapters start fresh over the merged base
    other, report = ck.build_model(attn_lora_rank=2, lora_alpha=4.0)
    assert report['restored_lora'] == [] and len(report['fresh_lora']) == 4
    with torch.no_grad():
        for loaded in (same.eval(), other.eval()):
            assert (loaded(ids, ids)[0] - model(ids, ids)[0]).abs().max() < 1e-5


# -----------------------------------------------------------------------------
# the training helpers (core/training.py)

def test_lr_schedule_is_nanogpts():
    lr = lambda it: get_lr(it, 1e-3, 10, 100, 1e-4)
    assert [lr(0), lr(4), lr(9)] == [1e-3 * 1 / 11, 1e-3 * 5 / 11, 1e-3 * 10 / 11] # linear warmup
    # python floats: lr(100) is within float64 roundings of min_lr, the others equal it
    assert lr(10) == 1e-3 and lr(100) == pytest.approx(1e-4, abs=1e-12) and lr(101) == lr(10**6) == 1e-4
    assert get_lr(10, 1e-3, 10, 10, 1e-4) == 1e-4 # warmup straight into min_lr: no decay to divide by
    assert lr(55) == pytest.approx((1e-3 + 1e-4) / 2) # cosine: halfway down at the middle of the decay
    decay = [lr(it) for it in range(10, 101)]
    assert all(a > b for a, b in zip(decay, decay[1:])) # falls all the way, never rises
    assert get_lr(55, 1e-3, 10, 100, 1e-4, decay_lr=False) == get_lr(0, 1e-3, 10, 100, 1e-4, decay_lr=False) == 1e-3
    optimizer = trained_model()[1]
    set_lr(optimizer, 0.5)
    assert [g['lr'] for g in optimizer.param_groups] == [0.5, 0.5]


def tiny_batches(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, len(CHARS), (2, 16), generator=g), torch.randint(0, len(CHARS), (2, 16), generator=g))
            for _ in range(n)]


def test_train_step_accumulates_clips_and_prefetches():
    torch.manual_seed(0)
    model = GPT(GPTConfig(**TINY))
    reference = copy.deepcopy(model)
    batches = tiny_batches(3)
    fetched, syncs = iter(batches[1:]), []
    def next_batch():
        syncs.append(model.require_backward_grad_sync)
        return next(fetched)
    # plain SGD with lr 1: the update is minus the gradient, so the gradient itself is checked
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    loss, pending = train_step(model, optimizer, batches[0], next_batch, grad_accum_steps=2, grad_clip=0.0, ddp=True)
    assert pending[0] is batches[2][0] and syncs == [False, True] # DDP syncs gradients on the last micro-step only
    losses = [reference(*b)[1] for b in batches[:2]]
    (sum(losses) / 2).backward() # accumulation: the gradient of the mean loss over the micro-batches
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q - q.grad, rtol=0, atol=1e-6)
    # the last micro-batch's loss, unscaled, left on the device: reading it would wait for the GPU every step
    assert isinstance(loss, torch.Tensor) and loss.item() == pytest.approx(losses[1].item(), abs=1e-6)
    assert all(p.grad is None for p in model.parameters())
    # clipping: the whole gradient scaled to norm grad_clip, so the SGD update has exactly that norm
    before = [p.detach().clone() for p in model.parameters()]
    train_step(model, optimizer, batches[0], lambda: batches[1], grad_clip=1e-3)
    update = torch.cat([(b - p.detach()).flatten() for b, p in zip(before, model.parameters())])
    assert update.norm().item() == pytest.approx(1e-3, rel=1e-4)
    # float16 training's scaled loss: the gradients are unscaled before they are clipped
    before = [p.detach().clone() for p in model.parameters()]
    scaler = torch.amp.GradScaler('cpu', init_scale=2.0 ** 16)
    train_step(model, optimizer, batches[0], lambda: batches[1], scaler=scaler, grad_clip=1e-3)
    update = torch.cat([(b - p.detach()).flatten() for b, p in zip(before, model.parameters())])
    assert update.norm().item() == pytest.approx(1e-3, rel=1e-4)


def test_estimate_loss_is_the_same_sample_each_time_in_eval_mode():
    torch.manual_seed(0)
    model = GPT(GPTConfig(**{**TINY, 'dropout': 0.5})) # in training mode, every forward would differ
    data = {'train': torch.randint(0, len(CHARS), (200,)), 'val': torch.randint(0, len(CHARS), (200,))}
    calls = []
    def get_batch(split, generator):
        calls.append((split, model.training))
        ix = torch.randint(len(data[split]) - 16, (2,), generator=generator)
        return (torch.stack([data[split][i:i + 16] for i in ix]), torch.stack([data[split][i + 1:i + 17] for i in ix]))
    rng = torch.get_rng_state()
    out = estimate_loss(model, get_batch, 3)
    assert torch.equal(torch.get_rng_state(), rng) # training's random stream is not disturbed
    assert calls == [('train', False)] * 3 + [('val', False)] * 3 and model.training # eval mode, then back
    assert estimate_loss(model, get_batch, 3) == out # the same batches every time
    model.eval()
    for split in ('train', 'val'): # the mean over the batches a generator seeded 1337 draws
        g = torch.Generator().manual_seed(1337)
        expected = sum(model(*get_batch(split, g))[1].item() for _ in range(3)) / 3
        assert out[split] == pytest.approx(expected, abs=1e-6)


def test_save_checkpoint_stores_the_pending_batch_random_state(tmp_path):
    model, optimizer, _ = trained_model()
    torch.manual_seed(5)
    rng = rng_state() # the state the pending batch was drawn from; the stream has moved on since
    torch.rand(10)
    scaler = torch.amp.GradScaler('cpu', enabled=True)
    save_checkpoint(tmp_path / 'a', model, optimizer, 7, 1.5, 1.25, run_config={'dataset': 'x'}, scaler=scaler, rng=rng)
    state = json.loads((tmp_path / 'a' / 'training_state.json').read_text())
    assert [state[k] for k in ('step', 'best_val_loss', 'val_loss', 'config')] == [7, 1.5, 1.25, {'dataset': 'x'}]
    assert state['rng'] == rng and state['scaler'] == scaler.state_dict()
    now = rng_state() # without one: the state at the save
    save_checkpoint(tmp_path / 'b', model, None, 7, 1.5, 1.25, scaler=torch.amp.GradScaler('cpu', enabled=False))
    state = json.loads((tmp_path / 'b' / 'training_state.json').read_text())
    assert state['rng'] == now and 'scaler' not in state and state['optimizer_file'] is None


def test_a_background_save_writes_the_state_of_its_call_byte_for_byte(tmp_path):
    # async_save: the call returns once the state is copied; training then changes parameters and moments in place
    from core.checkpoint import wait_for_saves
    model, optimizer, ids = trained_model(attn_lora_rank=2, embedding_mode='lora', embedding_rank=2)
    save_bundle(tmp_path / 'sync', model, 3, optimizer, val_loss=1.5)
    save_bundle(tmp_path / 'async', model, 3, optimizer, val_loss=1.5, background=True)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0) # what the next steps do, while the save is being written
        for s in optimizer.state.values():
            s['exp_avg'].add_(1.0)
    wait_for_saves()
    for name in ('model.pt', 'optimizer.pt', 'adapter.pt', 'config.json', 'training_state.json', 'manifest.json'):
        assert sha(tmp_path / 'sync' / name) == sha(tmp_path / 'async' / name), name
    # a failed background save is said at the next wait, with the usual message; the save before it is intact
    (tmp_path / 'a-file').write_text('not a directory')
    save_bundle(tmp_path / 'a-file', model, 4, optimizer, background=True)
    with pytest.raises(CheckpointError, match='the save of step 4 .written in the background. failed: .*a-file is a file'):
        wait_for_saves() # it names the step that failed: under async_save the error comes a save later
    wait_for_saves() # said once


def test_train_py_async_save_writes_the_same_checkpoint(tmp_path):
    run_train(tmp_path, '--out_dir', 'sync', '--max_iters', 12, '--eval_interval', 4)
    out = run_train(tmp_path, '--out_dir', 'async', '--max_iters', 12, '--eval_interval', 4, '--async_save=True')
    assert out.count('saving checkpoint to async') == 3
    for name in ('model.pt', 'optimizer.pt'):
        assert sha(tmp_path / 'sync' / name) == sha(tmp_path / 'async' / name), name
    assert read_checkpoint(tmp_path / 'async').step == 12
