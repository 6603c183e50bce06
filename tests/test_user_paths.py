"""
Paths a new user walked and the tests did not: each test reproduces one defect found that way (issue 11), and
fails if it comes back. Tiny models; the tools run as subprocesses, as a user runs them.
"""

import json
import pickle
import time

import torch

from model import GPT, GPTConfig
from core.checkpoint import KINDS, read_checkpoint, save_bundle
from core.commit import DamagedError
from tests.helpers import run_script

CHARS = [chr(32 + i) for i in range(95)] + ['\n']


def tiny(bias=True, **overrides):
    torch.manual_seed(0)
    model = GPT(GPTConfig(**{**dict(block_size=32, vocab_size=96, n_layer=2, n_head=2, n_embd=32, bias=bias), **overrides}))
    model.tokenizer_spec = {'token_kind': 'char', 'chars': CHARS}
    return model.eval()


def logits(model, ids):
    with torch.no_grad():
        return model(ids, ids)[0]


def test_every_kind_has_a_title_and_every_tool_names_it(tmp_path):
    # inspect used to crash with KeyError: 'hf' on a Hugging Face directory: a kind missing from its own table
    save_bundle(tmp_path / 'b', tiny(), 3, None, run_config={'dataset': 'mychars'})
    run_script('convert_checkpoints.py', tmp_path / 'b', '--to', 'hf', tmp_path / 'hf', cwd=tmp_path)
    run_script('convert_checkpoints.py', tmp_path / 'b', '--to', 'nanogpt', tmp_path / 'ng' / 'ckpt.pt', cwd=tmp_path)
    seen = {}
    for source in ('b', 'hf', 'ng/ckpt.pt'):
        code, out = run_script('inspect_model.py', '--checkpoint', tmp_path / source, cwd=tmp_path)
        seen[source] = out.split('=== FORMAT ===\n')[1].splitlines()[0]
        assert 'n_layer:2, n_head:2, n_embd:32' in out and 'Traceback' not in out
    assert seen == {'b': KINDS['bundle'].title, 'hf': KINDS['hf'].title, 'ng/ckpt.pt': KINDS['nanogpt'].title}
    assert all(kind.title for kind in KINDS.values())


def test_export_to_nanogpt_into_a_new_folder_writes_its_vocabulary(tmp_path):
    model = tiny(bias=False)
    save_bundle(tmp_path / 'deploy', model, 5, None, run_config={'dataset': 'mychars'})
    code, out = run_script('convert_checkpoints.py', tmp_path / 'deploy', '--to', 'nanogpt', 'out-x/ckpt.pt', cwd=tmp_path)
    assert 'no optimizer state' in out and 'data/mychars/meta.pkl' in out
    # nanoGPT's sample.py: pickle.load(meta.pkl), then stoi / itos; plain builtins only
    with open(tmp_path / 'out-x' / 'meta.pkl', 'rb') as f:
        meta = pickle.load(f)
    assert meta['vocab_size'] == 96 and [meta['itos'][i] for i in range(96)] == CHARS
    assert all(meta['stoi'][c] == i for i, c in enumerate(CHARS))
    ck = read_checkpoint(tmp_path / 'out-x' / 'ckpt.pt')
    assert ck.kind == 'nanogpt' and ck.optimizer_state() is None and ck.tokenizer == model.tokenizer_spec
    code, out = run_script('inspect_model.py', '--checkpoint', tmp_path / 'out-x' / 'ckpt.pt', cwd=tmp_path)
    assert 'Optimizer state: none usable' in out and 'optimizer state is empty' in out
    ids = torch.randint(0, 96, (2, 32), generator=torch.Generator().manual_seed(0))
    assert (logits(ck.build_model()[0].eval(), ids) - logits(model, ids)).abs().max() < 1e-5
    code, out = run_script('convert_checkpoints.py', tmp_path / 'deploy', '--to', 'nanogpt', 'out-x/ckpt.pt',
                           cwd=tmp_path, ok=False)
    assert code == 1 and 'out-x/ckpt.pt already exists' in out and '--force' in out


def test_classifier_bundle_is_never_taken_for_a_gpt(tmp_path):
    # finetune_hindi_xnli.py's best/ has the bundle's file names; it used to be reported as a 12 x 768 GPT
    from finetune_hindi_xnli import NLIClassifier, save_classifier
    from model import GPTBatched
    model = NLIClassifier(GPTBatched(64, 8, 2, 64, 32, head_dim=32, arch='small'))
    config = {'format_version': 1, 'kind': 'nli_classifier', 'vocab_size': 64, 'num_layers': 8, 'num_heads': 2,
              'model_dim': 64, 'head_dim': 32, 'max_seq_len': 32, 'arch': 'small', 'num_classes': 3,
              'labels': ['entailment', 'neutral', 'contradiction']}
    save_classifier(tmp_path / 'best', model, config, {'token_kind': 'char', 'chars': CHARS[:64]},
                    {'step': 34, 'metrics': {'accuracy': 0.825}})
    code, out = run_script('inspect_model.py', '--checkpoint', tmp_path / 'best', cwd=tmp_path)
    assert KINDS['classifier'].title in out and 'num_layers:8' in out and 'model_dim:64' in out
    assert 'n_layer' not in out and 'Validation: accuracy 0.8250' in out and 'Last recorded training step: 34' in out
    for script, args in (('generate.py', ['--checkpoint', tmp_path / 'best']),
                         ('convert_checkpoints.py', [tmp_path / 'best', '--to', 'hf', tmp_path / 'hf']),
                         ('train.py', ['--resume_from', tmp_path / 'best', '--max_iters', '1'])):
        code, out = run_script(script, *args, cwd=tmp_path, ok=False)
        assert code == 1 and 'Traceback' not in out and 'not a GPT language model' in out, (script, out)


def test_config_that_disagrees_with_its_weights_is_refused_in_seconds(tmp_path):
    save_bundle(tmp_path / 'deploy', tiny(), 3, None)
    config = json.loads((tmp_path / 'deploy' / 'config.json').read_text())
    (tmp_path / 'deploy' / 'config.json').write_text(json.dumps({**config, 'n_layer': 200000}))
    start = time.time()
    code, out = run_script('generate.py', '--checkpoint', tmp_path / 'deploy', '--max_new_tokens', 2, cwd=tmp_path, ok=False)
    assert code == 1 and 'n_layer 200000 (the weights have 2)' in out and 'Traceback' not in out
    assert time.time() - start < 30 # it used to build 200000 blocks (4.8 GB) before the load noticed
    code, out = run_script('inspect_model.py', '--checkpoint', tmp_path / 'deploy', cwd=tmp_path)
    assert 'not confirmed by the weights' in out and 'n_layer 200000 (the weights have 2)' in out


def test_manifest_names_never_reach_outside_the_checkpoint(tmp_path):
    save_bundle(tmp_path / 'b', tiny(), 3, None)
    manifest = json.loads((tmp_path / 'b' / 'manifest.json').read_text())
    for name in ('../../../../etc/passwd', '/etc/passwd', '..', 'sub/model.pt'):
        damaged = {**manifest, 'files': {**manifest['files'], name: {'size': 1, 'xxh3_64': '0'}}}
        (tmp_path / 'b' / 'manifest.json').write_text(json.dumps(damaged))
        try:
            read_checkpoint(tmp_path / 'b')
            raise AssertionError(f'{name} was accepted')
        except DamagedError as e:
            assert 'not a plain file name' in str(e) and 'bytes' not in str(e)
        code, out = run_script('inspect_model.py', '--checkpoint', tmp_path / 'b', cwd=tmp_path, ok=False)
        assert code == 1 and 'not a plain file name' in out and 'Traceback' not in out
    state = json.loads((tmp_path / 'b' / 'training_state.json').read_text())
    (tmp_path / 'b' / 'manifest.json').write_text(json.dumps(manifest))
    (tmp_path / 'b' / 'training_state.json').write_text(json.dumps({**state, 'optimizer_file': '../x.pt'}))
    try:
        read_checkpoint(tmp_path / 'b').optimizer_state()
        raise AssertionError('an optimizer file outside the checkpoint was accepted')
    except DamagedError as e:
        assert "'../x.pt'" in str(e)


def test_a_second_export_never_replaces_another_vocabulary(tmp_path):
    # two nanoGPT exports in one folder shared one meta.pkl: the second silently changed the first's vocabulary
    save_bundle(tmp_path / 'a', tiny(bias=False), 3, None)
    other = tiny(bias=False)
    other.tokenizer_spec = {'token_kind': 'char', 'chars': CHARS[::-1]}
    save_bundle(tmp_path / 'b', other, 3, None)
    run_script('convert_checkpoints.py', tmp_path / 'a', '--to', 'nanogpt', 'exp/a.pt', cwd=tmp_path)
    code, out = run_script('convert_checkpoints.py', tmp_path / 'b', '--to', 'nanogpt', 'exp/b.pt', cwd=tmp_path, ok=False)
    assert code == 1 and 'exp/meta.pkl holds another vocabulary' in out and not (tmp_path / 'exp' / 'b.pt').exists()
    assert read_checkpoint(tmp_path / 'exp' / 'a.pt').tokenizer['chars'] == CHARS
    run_script('convert_checkpoints.py', tmp_path / 'b', '--to', 'nanogpt', 'exp/b.pt', '--force', cwd=tmp_path)
    assert read_checkpoint(tmp_path / 'exp' / 'b.pt').tokenizer['chars'] == CHARS[::-1]


def test_eval_only_and_a_new_alpha_leave_the_old_state_alone(tmp_path):
    from tests.helpers import TINY_LORA_CONFIG, run_train
    run_train(tmp_path, TINY_LORA_CONFIG, '--out_dir', 'lora', '--max_iters', 4)
    before = {p.name: p.read_bytes() for p in (tmp_path / 'lora').iterdir()}
    out = run_train(tmp_path, TINY_LORA_CONFIG, '--init_from', 'resume', '--out_dir', 'lora', '--eval_only', 'True')
    assert 'resume check' in out and 'saving checkpoint' not in out
    assert {p.name: p.read_bytes() for p in (tmp_path / 'lora').iterdir()} == before # nothing rewritten
    # another lora_alpha: the adapters start fresh, and so does their optimizer state (the old moments were theirs)
    out = run_train(tmp_path, TINY_LORA_CONFIG, '--resume_from', 'lora', '--out_dir', 'alpha', '--max_iters', 5,
                    '--lora_alpha', 32.0)
    assert '9 adapters initialised fresh' in out and 'state carried over for 0 parameter tensors, fresh for 18' in out


def test_settings_that_do_nothing_are_said(tmp_path):
    # an embedding rank without embedding LoRA, an out_dir beside model_name, a run that saves nothing: all used to
    # pass in silence, and a failed run's empty out_dir looked like a run
    from tests.helpers import run_train
    out = run_train(tmp_path, '--max_iters', 0, '--eval_iters', 1, '--embedding_rank', 4, '--model_name', 'm',
                    '--out_dir', 'elsewhere')
    assert "note: embedding_rank = 4 is not used: embedding_mode = 'standard'" in out
    assert "note: out_dir = 'elsewhere' is not used: with model_name, checkpoints live in checkpoints/m" in out
    assert 'note: nothing was saved to checkpoints/m: no step was trained (max_iters = 0)' in out
    assert not (tmp_path / 'checkpoints').exists() and not (tmp_path / 'elsewhere').exists()
    out = run_train(tmp_path, '--max_iters', 0, '--eval_iters', 1, '--embedding_mode', 'lora')
    assert "note: embedding_mode = 'lora' with embedding_rank = 0: the embedding stays standard" in out


def test_eval_only_says_it_saves_nothing(tmp_path):
    from tests.helpers import run_train
    run_train(tmp_path, '--max_iters', 2, '--eval_iters', 1, '--out_dir', 'o')
    out = run_train(tmp_path, '--init_from', 'resume', '--out_dir', 'o', '--eval_only', 'True', '--eval_iters', 1)
    assert 'note: eval_only = True: nothing was saved' in out
    out = run_train(tmp_path, '--resume_from', 'o', '--out_dir', 'p', '--max_iters', 2, '--eval_iters', 1,
                    '--always_save_checkpoint', 'False')
    assert 'note: nothing was saved to p: the val loss never went below best_val_loss' in out


def test_wandb_without_a_login_is_one_clear_error(tmp_path, monkeypatch):
    # wandb.init raised UsageError from deep inside train.py; the run must say how to log in or log offline
    monkeypatch.setenv('HOME', str(tmp_path)) # no ~/.netrc: no wandb login on this machine
    for k in ('WANDB_API_KEY', 'WANDB_MODE', 'WANDB_DIR', 'WANDB_CONFIG_DIR'):
        monkeypatch.delenv(k, raising=False)
    from tests.helpers import run_train
    code, out = run_train(tmp_path, '--max_iters', 1, '--eval_iters', 1, '--wandb_log', 'True', ok=False)
    assert code == 1 and 'Traceback' not in out
    assert 'wandb could not start a run' in out and 'wandb login' in out and 'WANDB_MODE=offline' in out


def test_inspect_names_no_dataset_it_was_not_given(tmp_path):
    from tests.helpers import make_nanogpt_checkpoint
    path, _, _ = make_nanogpt_checkpoint(tmp_path, CHARS)
    ck = torch.load(path, weights_only=True)
    del ck['config'] # a ckpt.pt saved by a script that keeps no run config
    torch.save(ck, tmp_path / 'bare.pt')
    code, out = run_script('inspect_model.py', '--checkpoint', tmp_path / 'bare.pt', cwd=tmp_path)
    assert 'no vocabulary stored, and no dataset named in it' in out and 'None' not in out


def test_bad_input_under_torchrun_is_said_once(tmp_path):
    # every process found the error and said it, then torchrun's summary said nothing of it
    import os
    import subprocess
    import sys
    from tests.helpers import REPO
    env = {**os.environ, 'PYTHONPATH': str(REPO), 'OMP_NUM_THREADS': '1'}
    proc = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                           str(REPO / 'train.py'), '--max_iters=-5'], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    out = proc.stdout + proc.stderr
    lines = out.splitlines()
    assert proc.returncode == 1
    assert lines.count('error: max_iters = -5 cannot be used: it must be at least 0') == 1, out
    assert lines.count('Overriding: max_iters = -5') == 1, out
    # torchrun's own failure summary quotes the message instead of 'To enable traceback see ...'
    assert 'traceback : error: max_iters = -5 cannot be used' in out and 'To enable traceback' not in out


def test_a_resume_that_trains_nothing_leaves_its_checkpoint_alone(tmp_path):
    # max_iters at or below the checkpoint's step re-saved it untrained, as this run's (standard) model: the LoRA
    # factors (adapter.pt) and the optimizer moments were lost without a word
    from tests.helpers import TINY_LORA_CONFIG, run_train
    run_train(tmp_path, TINY_LORA_CONFIG, '--out_dir', 'lora', '--max_iters', 4)
    before = {p.name: p.read_bytes() for p in (tmp_path / 'lora').iterdir()}
    out = run_train(tmp_path, '--init_from', 'resume', '--out_dir', 'lora', '--max_iters', 2)
    assert "note: max_iters = 2 is not above the checkpoint's step 4: no step is trained; lora is left as it is" in out
    assert 'saving checkpoint' not in out and 'nothing was saved' not in out
    assert {p.name: p.read_bytes() for p in (tmp_path / 'lora').iterdir()} == before
    # into another out_dir (config/deploy_standard.py's way) the untrained model is saved, and that is said
    out = run_train(tmp_path, '--resume_from', 'lora', '--out_dir', 'deploy', '--max_iters', 0)
    assert 'the model is evaluated and saved to deploy' in out and 'saving checkpoint to deploy' in out


def test_ctrl_c_says_where_the_run_stands(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    from tests.helpers import REPO, TINY_CONFIG
    env = {**os.environ, 'PYTHONPATH': str(REPO), 'OMP_NUM_THREADS': '1'}
    proc = subprocess.Popen([sys.executable, str(REPO / 'train.py'), TINY_CONFIG, '--max_iters=100000',
                             '--eval_interval=5', '--eval_iters=1', '--out_dir=run'], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout: # wait for the first save, then press Ctrl-C
        lines.append(line)
        if line.startswith('saving checkpoint'):
            break
    time.sleep(1)
    proc.send_signal(signal.SIGINT)
    out = ''.join(lines) + proc.stdout.read()
    assert proc.wait(timeout=120) == 130, out
    assert 'Traceback' not in out and 'KeyboardInterrupt' not in out
    last = [l for l in out.splitlines() if l.startswith('interrupted at iter')]
    assert len(last) == 1 and 'run holds the checkpoint of step' in last[0] and '--resume_from=run' in last[0], out
    step = int(last[0].split('checkpoint of step ')[1].split(';')[0])
    assert read_checkpoint(tmp_path / 'run').step == step >= 5
