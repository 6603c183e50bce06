"""
Helpers shared by the test files: run the real scripts as a user would, and build the files other tools write.
"""

import ast
import contextlib
import os
import pickle
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model import GPT, GPTConfig

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / 'shared'
# GPT-2 BPE offline: tiktoken's gpt2 files from TIKTOKEN_CACHE_DIR, else the shared cache beside the checkout
TIKTOKEN_CACHE = Path(os.environ.get('TIKTOKEN_CACHE_DIR') or SHARED / 'data' / 'tiktoken_cache')
GPT2_BPE = TIKTOKEN_CACHE.is_dir() and any(TIKTOKEN_CACHE.iterdir())
needs_gpt2_bpe = pytest.mark.skipif(not GPT2_BPE, reason="GPT-2 BPE: tiktoken's gpt2 files are not here, and offline "
                                    'they cannot be fetched (set TIKTOKEN_CACHE_DIR)')
TINY_CONFIG = str(REPO / 'config' / 'test_checkpoint_compatibility.py')
TINY_LORA_CONFIG = str(REPO / 'config' / 'test_checkpoint_compatibility_lora.py')


def run_python(args, cwd, env, timeout=600):
    """ `python *args` in cwd with env, a fresh process: what subprocess.run(..., capture_output=True) returns """
    return subprocess.run([sys.executable, *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def run_script(script, *args, cwd, ok=True):
    """ run one of the project's scripts in `cwd`; returns (exit code, stdout + stderr) """
    env = {**os.environ, 'PYTHONPATH': str(REPO)}
    if GPT2_BPE:
        env['TIKTOKEN_CACHE_DIR'] = str(TIKTOKEN_CACHE)
    proc = run_python([REPO / script, *args], cwd=cwd, env=env)
    out = proc.stdout + proc.stderr
    if ok and proc.returncode != 0:
        raise AssertionError(f'{script} {" ".join(map(str, args))} exited {proc.returncode}:\n{out[-3000:]}')
    return proc.returncode, out


def run_in_process(script, *args, cwd, monkeypatch, capsys):
    """
    `python script args` run in this process, for a tool's answer to bad input (its main() through core/cli.run):
    (exit code, stdout + stderr). Only for tools whose __main__ is a main function; what the interpreter itself does
    with an error (train.py's excepthook) and variables read at import are tested with run_script.
    """
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, 'argv', [str(REPO / script), *map(str, args)])
    monkeypatch.setattr(sys, 'path', list(sys.path)) # data/prepare.py puts the checkout first
    monkeypatch.setattr(sys, 'excepthook', sys.excepthook) # sample.py and train.py set their own
    capsys.readouterr()
    with torch.random.fork_rng(devices=[]): # a tool seeds torch: this process's tests keep their own draws
        try:
            runpy.run_path(str(REPO / script), run_name='__main__')
            code = 0
        except SystemExit as e: # as the interpreter reads it: a number is the code, a text is printed and means 1
            code = e.code if isinstance(e.code, int) else 0 if e.code is None else print(e.code, file=sys.stderr) or 1
    out = capsys.readouterr()
    return code, out.out + out.err


def run_train(cwd, *args, ok=True):
    """ train.py with the tiny test config first; returns its output (or (code, output) when ok=False) """
    code, out = run_script('train.py', TINY_CONFIG, *args, cwd=cwd, ok=ok)
    return out if ok else (code, out)


def losses_by_iter(output):
    """ {iter: loss} from train.py's 'iter N: loss X' lines """
    return {int(line.split()[1][:-1]): float(line.split()[3][:-1])
            for line in output.splitlines() if line.startswith('iter ')}


def make_nanogpt_checkpoint(directory, vocab_chars, n_layer=2, n_head=2, n_embd=32, block_size=32, steps=3,
                            dataset='mychars', compiled=True):
    """
    A ckpt.pt exactly as the public nanoGPT train.py writes it: raw_model is the torch.compile wrapper (keys
    with _orig_mod.), positional AdamW state from configure_optimizers, best_val_loss a 0-d tensor, config a dict
    of every train.py setting; plus data/<dataset>/meta.pkl as nanoGPT's prepare.py writes it. The model is our
    GPT, whose keys and math equal nanoGPT's (checked against the public code once: max |logits diff| 0).
    Returns (path of ckpt.pt, the model, the ids it was trained on).
    """
    directory = Path(directory)
    (directory / 'out').mkdir(parents=True, exist_ok=True)
    model_args = dict(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=block_size, bias=False,
                      vocab_size=len(vocab_chars), dropout=0.0)
    torch.manual_seed(0)
    model = GPT(GPTConfig(**model_args))
    optimizer = model.configure_optimizers(0.1, 1e-3, (0.9, 0.99), 'cpu')
    ids = torch.randint(0, len(vocab_chars), (4, block_size))
    for _ in range(steps):
        loss = model(ids, ids)[1]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    raw_model = torch.compile(model) if compiled else model
    config = dict(out_dir='out', eval_interval=250, log_interval=10, eval_iters=200, eval_only=False,
                  always_save_checkpoint=False, init_from='scratch', wandb_log=False, wandb_project='owt',
                  wandb_run_name='mini-gpt', dataset=dataset, gradient_accumulation_steps=1, batch_size=4,
                  block_size=block_size, n_layer=n_layer, n_head=n_head, n_embd=n_embd, dropout=0.0, bias=False,
                  learning_rate=1e-3, max_iters=steps, weight_decay=0.1, beta1=0.9, beta2=0.99, grad_clip=1.0,
                  decay_lr=True, warmup_iters=100, lr_decay_iters=5000, min_lr=1e-4, backend='nccl',
                  device='cpu', dtype='float32', compile=compiled)
    checkpoint = {'model': raw_model.state_dict(), 'optimizer': optimizer.state_dict(), 'model_args': model_args,
                  'iter_num': steps, 'best_val_loss': torch.tensor(2.5), 'config': config}
    path = directory / 'out' / 'ckpt.pt'
    torch.save(checkpoint, path)
    meta_dir = directory / 'data' / dataset
    meta_dir.mkdir(parents=True, exist_ok=True)
    stoi = {ch: i for i, ch in enumerate(vocab_chars)}
    with open(meta_dir / 'meta.pkl', 'wb') as f:  # the fixture of a file nanoGPT writes, not our format
        pickle.dump({'vocab_size': len(vocab_chars), 'itos': {i: ch for ch, i in stoi.items()}, 'stoi': stoi}, f)
    return path, model, ids


def fill_with_step(model, optimizer, step):
    """ every weight and optimizer moment set to `step`, so a checkpoint that mixes two saves is visible """
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(step)
        for s in optimizer.state.values():
            s['exp_avg'].fill_(step)
            s['exp_avg_sq'].fill_(step)


def wandb_offline_run(wandb_dir):
    """
    (history rows, summary) of the one offline run under wandb_dir, read from its run-*.wandb file: a LevelDB-style
    log (7-byte header, 32 KiB blocks, records of crc/length/type + data) of wandb's protobuf Records.
    """
    import json as _json
    import struct
    from wandb.proto import wandb_internal_pb2
    runs = list(Path(wandb_dir).glob('wandb/offline-run-*/run-*.wandb'))
    assert len(runs) == 1, runs
    data, pos, chunk, history, summary = runs[0].read_bytes(), 7, b'', [], {}
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7: # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack('<IHB', data[pos:pos + 7])
        chunk, pos = chunk + data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind not in (1, 4): # 1 full, 4 last piece of a record; 2, 3 first and middle pieces
            continue
        record = wandb_internal_pb2.Record()
        record.ParseFromString(chunk)
        chunk = b''
        items = {'history': lambda: record.history.item, 'summary': lambda: record.summary.update}
        kind_name = record.WhichOneof('record_type')
        if kind_name in items:
            values = {i.key or '/'.join(i.nested_key): _json.loads(i.value_json) for i in items[kind_name]()}
            history.append(values) if kind_name == 'history' else summary.update(values)
    return history, summary


def interrupted_after_first_save(monkeypatch, owner, run, name='save_classifier'):
    """ run() with owner.<name> (a module's function, or a class's static method) crashing right after its first save
    of a last/ directory: a fine-tune cut at its first evaluation, its last/ complete """
    import pytest

    class Crash(Exception):
        pass
    save = getattr(owner, name)
    def save_then_crash(path, *a, **k):
        save(path, *a, **k)
        if os.path.basename(path) == 'last':
            raise Crash
    wrap = staticmethod if isinstance(owner, type) else (lambda f: f)
    monkeypatch.setattr(owner, name, wrap(save_then_crash))
    with pytest.raises(Crash):
        run()
    monkeypatch.setattr(owner, name, wrap(save))


class Logits(torch.nn.Module):
    """ a transformers model called the way our tests call a GPT: model(ids, targets)[0] are the logits """
    def __init__(self, hf):
        super().__init__()
        self.hf = hf

    def forward(self, ids, targets=None):
        return self.hf(input_ids=ids).logits, None


def make_peft_adapter(base_dir, adapter_dir, vocab_size, targets, r=4, alpha=16, steps=3, **options):
    """ a tiny random GPT-2 saved with save_pretrained in base_dir, and a LoRA adapter made by peft's own
    get_peft_model on it, trained a few steps (B != 0), saved in adapter_dir; returns the peft model (Logits) """
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(1)
    base = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=32, vocab_size=vocab_size))
    base.save_pretrained(base_dir)
    model = get_peft_model(base, LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), fan_in_fan_out=True,
                                            task_type='CAUSAL_LM', **options))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, vocab_size, (4, 32))
    for _ in range(steps):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(adapter_dir)
    return Logits(model.eval())


def train_defaults():
    """ train.py's config globals (those above `config_keys = ...`), literal values, None for expressions """
    defaults = {}
    for node in ast.parse((REPO / 'train.py').read_text()).body:
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            if node.targets[0].id == 'config_keys':
                break
            with contextlib.suppress(ValueError):
                defaults[node.targets[0].id] = None
                defaults[node.targets[0].id] = ast.literal_eval(node.value)
    return defaults
