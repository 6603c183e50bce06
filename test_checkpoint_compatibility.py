"""
The checkpoint compatibility suite: small models are trained a few steps with the real train.py,
saved, and loaded in every direction: standard -> LoRA, LoRA -> standard, rank change, same-config resume,
nanoGPT's ckpt.pt and legacy files. Each check measures: logits or losses before and after, keys, optimizer
tensors carried over by name, and clear errors for bad input.

$ python test_checkpoint_compatibility.py        # prints each check with a check mark or a cross, exits 1 on failure
$ python -m pytest test_checkpoint_compatibility.py
"""

import hashlib
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from model import GPT, GPTConfig
from core.checkpoint import CheckpointManager, read_checkpoint
from core.training import read_resume_check
from tests.helpers import (TINY_LORA_CONFIG, losses_by_iter, make_nanogpt_checkpoint, run_script,
                           run_train)

RESUME_TOLERANCE = 1e-4  # |first evaluation after resume - evaluation stored at save|
# relative difference of the printed losses, resumed vs uninterrupted: standard runs repeat exactly; a LoRA resume
# rebuilds its base as merged - B@A*s, one float32 rounding of each weight, which 20 steps carry to a few eps of the loss
TRAJECTORY_TOLERANCE = {'standard': 0.0, 'lora': 1e-6}
LORA = ['--attn_lora_rank', 4, '--mlp_lora_rank', 4, '--embedding_mode', 'lora', '--embedding_rank', 4, '--lora_alpha', 8.0]


def standard_keys(bundle):
    return list(torch.load(Path(bundle) / 'model.pt', weights_only=True))


def test_standard_to_lora(tmp_path):
    """standard -> LoRA: weights remapped to main weights, fresh adapters, same function, new optimizer"""
    run_train(tmp_path, '--out_dir', 'std')
    out = run_train(tmp_path, TINY_LORA_CONFIG, '--resume_from', 'std', '--out_dir', 'lora', '--max_iters', 30)
    now, stored = read_resume_check(out)
    assert abs(now - stored) < RESUME_TOLERANCE, out
    assert 'keys remapped to adapter main weights' in out and 'adapters initialised fresh' in out
    assert '9 adapters initialised fresh' in out
    assert 'optimizer: state carried over for 0 parameter tensors, fresh for 18' in out  # only LoRA factors train
    assert standard_keys(tmp_path / 'lora') == standard_keys(tmp_path / 'std')  # the universal format
    state = json.loads((tmp_path / 'lora' / 'training_state.json').read_text())
    assert state['step'] == 30 and state['adapter']['attn_lora_rank'] == 4 and state['adapter_file'] == 'adapter.pt'


def test_lora_to_standard(tmp_path):
    """LoRA -> standard: merged weights give the LoRA run's evaluation; norms and biases keep their optimizer state"""
    run_train(tmp_path, TINY_LORA_CONFIG, '--out_dir', 'lora', '--bias', True, '--lora_train_norms_biases', True)
    out = run_train(tmp_path, '--resume_from', 'lora', '--out_dir', 'std', '--max_iters', 30)
    now, stored = read_resume_check(out)
    assert abs(now - stored) < RESUME_TOLERANCE, out
    # the LoRA run trained its 2 x 4 LayerNorms + 2 x 4 linear biases + ln_f (2) by name; the rest is new
    n_norms_biases = 2 * (2 * 2 + 4) + 2
    assert f'optimizer: state carried over for {n_norms_biases} parameter tensors' in out, out
    model = GPT(GPTConfig(**{k: v for k, v in json.loads((tmp_path / 'lora' / 'config.json').read_text()).items()
                             if k != 'format_version'}))
    model.load_state_dict(torch.load(tmp_path / 'lora' / 'model.pt', weights_only=True), strict=True)


def test_rank_change(tmp_path):
    """rank 4 -> rank 8: the rank-4 update stays in the base, rank-8 adapters start fresh, nothing is lost"""
    run_train(tmp_path, TINY_LORA_CONFIG, '--out_dir', 'r4')
    out = run_train(tmp_path, TINY_LORA_CONFIG, '--resume_from', 'r4', '--out_dir', 'r8', '--max_iters', 30,
                    '--attn_lora_rank', 8, '--mlp_lora_rank', 8)
    now, stored = read_resume_check(out)
    assert abs(now - stored) < RESUME_TOLERANCE, out
    assert '8 adapters initialised fresh' in out and '1 adapters restored' in out  # the embedding kept rank 4
    # the optimizer state of the embedding's factors (same rank, same names) comes along; the rest is new
    assert 'optimizer: state carried over for 2 parameter tensors, fresh for 16' in out, out


def check_same_config_resume(tmp_path, extra, tolerance):
    full = run_train(tmp_path, *extra, '--out_dir', 'full', '--max_iters', 30, '--dropout', 0.1)
    run_train(tmp_path, *extra, '--out_dir', 'cut', '--max_iters', 10, '--dropout', 0.1)
    resumed = run_train(tmp_path, *extra, '--out_dir', 'cut', '--init_from', 'resume', '--max_iters', 30, '--dropout', 0.1)
    a, b = losses_by_iter(full), losses_by_iter(resumed)
    assert sorted(b) == list(range(10, 30))
    worst = max(abs(a[i] - b[i]) / a[i] for i in b)
    assert worst <= tolerance, f'resumed losses differ by {worst:.2e} relative'
    return resumed


def test_same_config_resume_standard(tmp_path):
    """same-config resume (standard): interrupted + resumed losses equal an uninterrupted run's"""
    out = check_same_config_resume(tmp_path, [], TRAJECTORY_TOLERANCE['standard'])
    assert 'optimizer: state carried over for 15 parameter tensors, fresh for 0' in out  # wte, wpe, 2 x 6, ln_f


def test_same_config_resume_lora(tmp_path):
    """same-config resume (LoRA): adapters and their optimizer state restored, trajectory unchanged"""
    out = check_same_config_resume(tmp_path, [TINY_LORA_CONFIG], TRAJECTORY_TOLERANCE['lora'])
    assert '9 adapters restored' in out and 'state carried over for 18 parameter tensors, fresh for 0' in out


def test_merge_accuracy_and_keys(tmp_path):
    """a trained LoRA model and its saved merged standard model agree to 1e-5; keys are standard"""
    config = dict(block_size=32, vocab_size=50, n_layer=2, n_head=2, n_embd=32, attn_lora_rank=4, mlp_lora_rank=4,
                  embedding_mode='lora', embedding_rank=4, lora_alpha=8.0)
    torch.manual_seed(0)
    lora = GPT(GPTConfig(**config))
    optimizer = lora.configure_optimizers(0.1, 1e-2, (0.9, 0.99), 'cpu')
    ids = torch.randint(0, 50, (4, 32))
    batches = [(ids, ids)] * 6
    lora.fit(batches, optimizer, max_iters=5, checkpoint_dir=tmp_path / 'fit', log_interval=0)
    deployed = CheckpointManager.load_for_inference(str(tmp_path / 'fit'))
    assert all(p.requires_grad for p in deployed.parameters()) and not any('lora' in k for k in deployed.state_dict())
    lora.eval()
    with torch.no_grad():
        diff = (lora(ids, ids)[0] - deployed(ids, ids)[0]).abs().max().item()
    assert diff < 1e-5, diff
    assert read_checkpoint(tmp_path / 'fit').step == 5


def test_optimizer_by_name(tmp_path):
    """optimizer state is stored by parameter name and restored to the right tensors after a change of trainable set"""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=40, n_layer=2, n_head=2, n_embd=16))
    optimizer = model.configure_optimizers(0.1, 1e-2, (0.9, 0.99), 'cpu')
    ids = torch.randint(0, 40, (2, 16))
    model.fit([(ids, ids)] * 3, optimizer, max_iters=2, log_interval=0)
    model.save_checkpoint_bundle(tmp_path / 'b', step=2, optimizer_state=optimizer.state_dict())  # the bundle format's call
    saved = torch.load(tmp_path / 'b' / 'optimizer.pt', weights_only=True)
    assert 'transformer.h.1.ln_2.weight' in saved['state']  # keyed by name, not position
    manager = CheckpointManager('b', root=str(tmp_path))
    lora, opt, start = manager.initialize_for_training(
        GPTConfig(block_size=16, vocab_size=40, n_layer=2, n_head=2, n_embd=16, attn_lora_rank=2,
                  lora_train_norms_biases=True), 'char', 'unused', learning_rate=1e-3)
    assert start == 2
    param = lora.transformer.h[1].ln_2.weight
    assert torch.equal(opt.state[param]['exp_avg'], saved['state']['transformer.h.1.ln_2.weight']['exp_avg'])
    assert not opt.state[lora.transformer.h[0].attn.c_attn.lora_A.weight]  # a new parameter starts fresh


def test_nanogpt_checkpoint_resumes_with_lora_inspects_and_generates(tmp_path):
    """a public-nanoGPT ckpt.pt (compiled keys, meta.pkl vocabulary) resumes with LoRA, inspects, generates"""
    chars = sorted(set('abcdefghijklmnopqrstuvwxyz .,\n'))
    path, model, ids = make_nanogpt_checkpoint(tmp_path, chars)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    ck = read_checkpoint(path)  # finds data/mychars/meta.pkl beside the run directory, as sample.py would
    assert ck.kind == 'nanogpt' and ck.tokenizer == {'token_kind': 'char', 'chars': chars} and ck.step == 3
    assert ck.optimizer_state() is not None  # positional state named through nanoGPT's parameter order
    loaded, report = ck.build_model(attn_lora_rank=4)
    model.eval()
    with torch.no_grad():
        assert (loaded(ids, ids)[0] - model(ids, ids)[0]).abs().max().item() < 1e-5
    code, out = run_script('inspect_model.py', '--checkpoint', path, cwd=tmp_path)
    assert 'Legacy single file (nanoGPT ckpt.pt)' in out and 'n_layer:2' in out and f'vocab     : {len(chars)} characters' in out
    assert 'Last recorded training step: 3' in out and 'Best val loss: 2.5000' in out
    code, out = run_script('generate.py', '--checkpoint', path, '--num_samples', 1, '--max_new_tokens', 20,
                           '--start', 'ab', cwd=tmp_path)
    sample = out.split('---------------')[0].strip()
    assert sample.startswith('ab') and len(sample) >= 20 and set(sample) <= set(chars), out
    # train.py resumes it, on data with the same vocabulary: as a standard model and with LoRA
    (tmp_path / 'text.txt').write_text(''.join(chars) * 200)
    run_script('data/prepare.py', '--dataset', 'mychars', '--input', 'text.txt', '--out_dir', 'data/mychars', cwd=tmp_path)
    out = run_train(tmp_path, '--dataset', 'mychars', '--resume_from', path, '--out_dir', 'std', '--max_iters', 5)
    assert 'loaded nanogpt checkpoint' in out and '(step 3)' in out
    assert 'optimizer: state carried over for 15 parameter tensors, fresh for 0' in out  # nanoGPT's order, named
    out = run_train(tmp_path, '--dataset', 'mychars', '--resume_from', path, '--out_dir', 'lora', '--max_iters', 5, *LORA)
    assert '9 keys remapped to adapter main weights' in out and '9 adapters initialised fresh' in out
    assert standard_keys(tmp_path / 'lora') == [k.replace('_orig_mod.', '') for k in torch.load(path, weights_only=True)['model']]
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest  # never modified


def test_model_name_migrates_legacy(tmp_path):
    """`train.py --model_name dante` resumes checkpoints/dante/latest.pt and writes a bundle beside it"""
    run_train(tmp_path, '--out_dir', 'std', '--max_iters', 10)
    ck = read_checkpoint(tmp_path / 'std')
    model, _ = ck.build_model()
    # the older single-file layout: config dict (architecture and run settings together), step, tokenizer
    legacy = {'model': model.state_dict(), 'optimizer': None, 'step': 10, 'tokenizer': ck.tokenizer,
              'config': {**{k: getattr(ck.config, k) for k in ('n_layer', 'n_head', 'n_embd', 'block_size', 'bias',
                                                               'vocab_size', 'dropout')}, 'batch_size': 4, 'device': 'cpu'}}
    (tmp_path / 'checkpoints' / 'dante').mkdir(parents=True)
    latest = tmp_path / 'checkpoints' / 'dante' / 'latest.pt'
    torch.save(legacy, latest)
    before = hashlib.sha256(latest.read_bytes()).hexdigest()
    out = run_train(tmp_path, '--model_name', 'dante', '--max_iters', 15)
    assert 'loaded legacy checkpoint' in out and 'latest.pt (step 10)' in out
    bundle = read_checkpoint(tmp_path / 'checkpoints' / 'dante')
    assert bundle.kind == 'bundle' and bundle.step == 15
    assert hashlib.sha256(latest.read_bytes()).hexdigest() == before  # the legacy file is kept as it was
    out = run_train(tmp_path, '--model_name', 'dante', '--max_iters', 20)  # next time: the bundle wins
    assert 'loaded bundle checkpoint' in out and '(step 15)' in out


def test_error_resilience(tmp_path):
    """bad input ends with one clear error and exit code 1, never a traceback; nothing is overwritten"""
    run_train(tmp_path, '--out_dir', 'std', '--max_iters', 10)
    config = json.loads((tmp_path / 'std' / 'config.json').read_text())
    (tmp_path / 'wide').mkdir()
    for name in ('model.pt', 'tokenizer.json', 'training_state.json'):
        (tmp_path / 'wide' / name).write_bytes((tmp_path / 'std' / name).read_bytes())
    (tmp_path / 'wide' / 'config.json').write_text(json.dumps({**config, 'n_embd': 64}))
    code, out = run_train(tmp_path, '--resume_from', 'wide', '--out_dir', 'x', ok=False)
    assert code == 1 and 'Traceback' not in out and 'says n_embd 64 (the weights have 32)' in out
    assert not (tmp_path / 'x' / 'model.pt').exists()
    (tmp_path / 'wide' / 'config.json').write_text('{"n_layer": 2,')
    code, out = run_train(tmp_path, '--resume_from', 'wide', ok=False)
    assert code == 1 and 'not valid JSON' in out and 'config.json' in out and 'Traceback' not in out
    code, out = run_train(tmp_path, '--resume_from', 'nowhere', ok=False)
    assert code == 1 and 'no checkpoint at nowhere' in out
    code, out = run_train(tmp_path, '--resume_from', 'std', '--max_iter', 5, ok=False)
    assert code == 1 and 'Did you mean: max_iters' in out
    code, out = run_script('inspect_model.py', '--checkpoint', tmp_path / 'wide', cwd=tmp_path, ok=False)
    assert code == 1 and 'Traceback' not in out and 'config.json' in out


# -----------------------------------------------------------------------------
# `python test_checkpoint_compatibility.py`: the same checks, one line each

if __name__ == '__main__':
    checks = [f for name, f in list(globals().items()) if name.startswith('test_') and callable(f)]
    failed = 0
    for check in checks:
        t0 = time.time()
        with tempfile.TemporaryDirectory() as tmp:
            try:
                check(Path(tmp))
                print(f'\u2713 {check.__doc__.strip()} ({time.time() - t0:.1f}s)')
            except Exception as e:
                failed += 1
                print(f'\u2717 {check.__doc__.strip()}\n    {type(e).__name__}: {str(e)[:2000]}')
    print(f'{len(checks) - failed} passed, {failed} failed')
    sys.exit(1 if failed else 0)
