"""
Scaling up: train.py under torchrun with 2 CPU processes (gloo), then resumed with 1 process and with LoRA, and
with 2 processes again; and wandb logging, checked in the files of an offline run.
"""

import json
import os
import subprocess
import sys

import torch

from core.checkpoint import read_checkpoint
from core.training import read_resume_check
from tests.helpers import REPO, TINY_CONFIG, run_train, wandb_offline_run


def torchrun(cwd, *args):
    env = {**os.environ, 'PYTHONPATH': str(REPO), 'OMP_NUM_THREADS': '1', 'PYTHONUNBUFFERED': '1'} # no mid-line interleaving
    command = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
               str(REPO / 'train.py'), TINY_CONFIG, *map(str, args)]
    proc = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_torchrun_two_processes_then_resume_with_one_and_with_lora(tmp_path):
    out = torchrun(tmp_path, '--out_dir', 'ddp', '--max_iters', 10, '--gradient_accumulation_steps', 2)
    # the config's tokens per step, shared by the two processes: 2 micro-steps of 4 x 32 tokens, one per process
    assert out.count('tokens per iteration will be: 256') == 1 and 'does not divide' not in out # rank 0 logs
    assert out.count('saving checkpoint to ddp') == 1 # step 10 saves, by rank 0 only (two lines: both ranks saved)
    ddp = read_checkpoint(tmp_path / 'ddp')
    assert ddp.kind == 'bundle' and ddp.step == 10 and ddp.manifest is not None
    # the same format as a single-process run's bundle
    run_train(tmp_path, '--out_dir', 'single', '--max_iters', 10)
    single = read_checkpoint(tmp_path / 'single')
    assert list(ddp.weights()) == list(single.weights()) and sorted(ddp.training_state) == sorted(single.training_state)
    # each process trains on batches of its own: had both drawn the one process's batches (one seed for all), the
    # averaged gradients would be those batches' and every step exactly the one-process run's
    moved = [k for k, v in single.weights().items() if not torch.equal(v, ddp.weights()[k])]
    assert len(moved) > len(single.weights()) // 2, moved
    # resumed by one process, and with LoRA: nothing lost across the change of process count
    out = run_train(tmp_path, '--resume_from', 'ddp', '--out_dir', 'one', '--max_iters', 15)
    now, stored = read_resume_check(out)
    assert abs(now - stored) < 1e-4 and 'state carried over for 15 parameter tensors, fresh for 0' in out
    out = run_train(tmp_path, '--resume_from', 'ddp', '--out_dir', 'lora', '--max_iters', 15, '--attn_lora_rank', 4)
    assert abs(read_resume_check(out)[0] - read_resume_check(out)[1]) < 1e-4 and 'adapters initialised fresh' in out
    # and back under torchrun, with LoRA, from the single-process LoRA bundle
    out = torchrun(tmp_path, '--resume_from', 'lora', '--out_dir', 'lora-ddp', '--max_iters', 20, '--attn_lora_rank', 4,
                   '--gradient_accumulation_steps', 3)
    assert 'adapters restored' in out and read_checkpoint(tmp_path / 'lora-ddp').step == 20
    # 3 micro-steps do not divide among 2 processes: each runs 3, and says so once
    assert 'tokens per iteration will be: 768' in out and out.count('does not divide among 2 processes') == 1


def offline_wandb(tmp_path):
    return {**os.environ, 'WANDB_MODE': 'offline', 'WANDB_DIR': str(tmp_path), 'WANDB_SILENT': 'true'}


def test_wandb_offline_run_of_train_records_losses_lr_and_checkpoints(tmp_path):
    env = offline_wandb(tmp_path)
    proc = subprocess.run([sys.executable, str(REPO / 'train.py'), TINY_CONFIG, '--out_dir', 'run', '--max_iters', '10',
                           '--wandb_log', 'True', '--wandb_run_name', 'tiny'], cwd=tmp_path, env={**env, 'PYTHONPATH': str(REPO)},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    history, summary = wandb_offline_run(tmp_path)
    evals = [row for row in history if 'val/loss' in row]
    saves = [row for row in history if 'checkpoint/step' in row]
    state = read_checkpoint(tmp_path / 'run').training_state
    assert [row['iter'] for row in evals] == [0, 10] and all(row['lr'] > 0 and 'train/loss' in row for row in evals)
    assert evals[-1]['val/loss'] == state['val_loss'] # what was logged is what was saved, the same float
    assert saves == [{**saves[0], 'iter': 10, 'checkpoint/step': 10, 'checkpoint/dir': 'run'}]
    assert summary['iter'] == 10


def test_wandb_offline_run_of_finetuning_records_metrics_and_checkpoints(tmp_path):
    from load_checkpoint_helper import make_random_checkpoint
    from data.synthetic_xnli import make_xnli_data, round_up
    from tokenizers import Tokenizer
    data_dir, tokenizer = make_xnli_data(tmp_path, n_dev=200, n_test=30)
    vocab = round_up(Tokenizer.from_file(str(tokenizer)).get_vocab_size())
    ckpt = make_random_checkpoint(tmp_path / 'small.pt', 'small', vocab, num_layers=8, num_heads=2, model_dim=64, head_dim=32)
    proc = subprocess.run([sys.executable, str(REPO / 'finetune_hindi_xnli.py'), '--data_dir', str(data_dir),
                           '--pretrained_ckpt_path', str(ckpt), '--tokenizer_name', str(tokenizer), '--n_head', '2',
                           '--num_epochs', '1', '--batch_size', '32', '--device', 'cpu', '--out_dir', 'out', '--wandb_log'],
                          cwd=tmp_path, env={**offline_wandb(tmp_path), 'PYTHONPATH': str(REPO)}, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    history, summary = wandb_offline_run(tmp_path)
    results = json.loads((tmp_path / 'out' / 'results.json').read_text())
    evals = [row for row in history if 'val/accuracy' in row]
    assert evals and evals[-1]['checkpoint/saved_last'] == evals[-1]['_step']
    assert any('lr/head' in row and row['lr/head'] > row['lr/pretrained'] for row in history)
    assert summary['test/accuracy'] == results['accuracy'] # one float, written twice

