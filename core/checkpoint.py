"""
Every tool finds, names and reads checkpoints here: the one table of checkpoint kinds (KINDS), find_checkpoint /
read_checkpoint, the bundle format's CheckpointManager, and the line a load prints.

Each kind lives in a module of its own with its recogniser, reader, writer and row (core/kind.py says what a kind
provides): our bundle (core/bundle.py), its sharded FSDP twin (core/sharded.py), Hugging Face GPT-2 (core/hf.py),
peft adapters (core/peft_adapter.py), nanoGPT's ckpt.pt and older single files (core/nanogpt.py), and the fine-tuned
classifier (core/classifier.py). read_checkpoint(path) takes a directory or a file, recognised by content, not name.
"""

import dataclasses
import difflib
import os
from pathlib import Path

import torch

from model import GPT, GPTConfig
from core.bundle import (BUNDLE, apply_optimizer_state, named_optimizer_state, rng_state, save_bundle, set_rng_state,
                         wait_for_saves)
from core.classifier import CLASSIFIER, MODDED_LM
from core.commit import MANIFEST_FILE, PREVIOUS, SAVING, CheckpointError, complete
from core.hf import HF, HF_WEIGHTS
from core.kind import BUNDLE_FILES, Checkpoint, adapter_config, describe_adapters
from core.nanogpt import LEGACY, LEGACY_NAMES, NANOGPT, read_meta_file
from core.peft_adapter import PEFT
from core.sharded import SHARDED, save_sharded
from core.tokenizer import char_spec, load_tokenizer

# the bundle format's Python API, importable from here as its documents show
__all__ = ['KINDS', 'WRITABLE', 'find_checkpoint', 'read_checkpoint', 'CheckpointManager', 'describe_load', 'Checkpoint',
           'CheckpointError', 'LEGACY_NAMES', 'save_bundle', 'save_sharded', 'wait_for_saves', 'apply_optimizer_state',
           'named_optimizer_state', 'rng_state', 'set_rng_state', 'describe_adapters']

# The one table of checkpoint kinds. Every tool finds, names, reads and writes checkpoints through it, so a kind
# cannot exist in one tool and not another. Recognised in this order: the first row whose recognise() answers
# (LEGACY takes any file, so a new kind goes before it).
KINDS = {kind.name: kind for kind in (HF, CLASSIFIER, MODDED_LM, PEFT, SHARDED, BUNDLE, LEGACY, NANOGPT)}
WRITABLE = tuple(name for name, kind in KINDS.items() if kind.write)


def find_checkpoint(path, legacy_file=None):
    """ (kind, path) of the checkpoint at path (a directory or a file), by KINDS; None if there is none """
    path = Path(path)
    if legacy_file:
        target = path / legacy_file if path.is_dir() else Path(legacy_file)
        return ('legacy', target) if target.is_file() else None
    for name, kind in KINDS.items():
        found = kind.recognise(path) if kind.recognise else None
        if found is not None:
            return name, found
    return None


def read_checkpoint(path, legacy_file=None, meta_path=None):
    name = Path(path).resolve().name
    if Path(path).is_dir() and name.startswith('.') and (SAVING in name or PREVIOUS in name) and not complete(path):
        final = name[1:].rsplit(SAVING if SAVING in name else PREVIOUS, 1)[0]
        raise CheckpointError(f'{path} is what an interrupted save left beside the checkpoint {final} (incomplete: no '
                              f'manifest, or files missing): read {Path(path).resolve().parent / final} instead; the '
                              'next save there clears it')
    found = find_checkpoint(path, legacy_file)
    if found is None and legacy_file:
        raise CheckpointError(f'--legacy_checkpoint {legacy_file}: there is no file {legacy_file} in {path} (it holds '
                              f'{", ".join(sorted(os.listdir(path))[:8]) or "nothing"})' if Path(path).is_dir() else
                              f'--legacy_checkpoint {legacy_file}: no such file, and {path} is not a directory')
    if found is None:
        expected = '; '.join(kind.looks for kind in KINDS.values() if kind.looks)
        if Path(path).is_dir():
            raise CheckpointError(f'no checkpoint in the directory {path}: expected {expected}; found '
                                  f'{", ".join(sorted(os.listdir(path))[:8]) or "nothing"}')
        if Path(path).exists():
            raise CheckpointError(f'no checkpoint at {path}: the file is none of the kinds this reads; expected {expected}')
        parent = Path(path).parent
        near = difflib.get_close_matches(Path(path).name, os.listdir(parent), n=3) if parent.is_dir() else []
        raise CheckpointError(f'no checkpoint at {path}: nothing is there' +
                              (f' (did you mean {" or ".join(str(parent / n) for n in near)}?)' if near else '') +
                              f'; expected {expected}')
    kind, found_path = found
    home = find_checkpoint(found_path.parent) if found_path.name in BUNDLE_FILES + (MANIFEST_FILE, HF_WEIGHTS) else None
    if home and home[0] != kind: # e.g. bundle/model.pt, read as a single file: one file of a checkpoint directory
        raise CheckpointError(f'{path} is one file of the checkpoint directory {found_path.parent} '
                              f'({KINDS[home[0]].title}): pass the directory, {found_path.parent}')
    ck = KINDS[kind].read(found_path, meta_path)
    if KINDS[kind].committed and Path(found_path) != Path(path):
        ck.notes.append(f'the last save to {path} was interrupted; read the complete checkpoint it left in {found_path}')
    if meta_path: # a vocabulary named on the command line wins, whatever the checkpoint stores
        stored, ck.tokenizer = ck.tokenizer, read_meta_file(meta_path)
        ck.notes.append(f'tokenizer: read from {meta_path}' + (' (--meta, in place of the one stored)'
                                                               if stored not in (None, ck.tokenizer) else ''))
    return ck


# -----------------------------------------------------------------------------
# the manager of the bundle format's Python API

class CheckpointManager:
    """ checkpoints/<model_name>/ as a bundle, with legacy files read from the same place """

    def __init__(self, model_name, root='checkpoints'):
        self.model_name = model_name
        self.checkpoint_dir = os.path.join(root, model_name)

    def get_path(self, filename):
        return os.path.join(self.checkpoint_dir, filename)

    def exists(self):
        return find_checkpoint(self.checkpoint_dir) is not None

    def load(self, legacy_file=None):
        return read_checkpoint(self.checkpoint_dir, legacy_file)

    def save(self, model, step, optimizer=None, **state):
        return save_bundle(self.checkpoint_dir, model, step, optimizer, **state)

    @staticmethod
    def load_for_inference(name_or_path, root='checkpoints', device='cpu', legacy_file=None):
        """ a standard (merged) model in eval mode, with .tokenizer_spec, from a bundle or a legacy file """
        path = name_or_path if os.path.exists(name_or_path) else os.path.join(root, name_or_path)
        model, _ = read_checkpoint(path, legacy_file).build_model(device)
        return model.eval()

    def initialize_for_training(self, config, token_kind, text, learning_rate, weight_decay=0.1,
                                betas=(0.9, 0.95), device='cpu'):
        """
        (model, optimizer, start_step): resumes from this manager's checkpoint when there is one (its base
        architecture, `config`'s adapter settings), else a fresh model with a tokenizer built from `text`.
        """
        config = config if isinstance(config, GPTConfig) else GPTConfig(**config)
        if self.exists():
            ck = self.load()
            model, report = ck.build_model(device, **adapter_config(config), dropout=config.dropout)
            print(describe_load(ck, report))
            named, start_step, fresh_lora = ck.optimizer_state(), ck.step, report['fresh_lora']
        else:
            spec = char_spec(text) if token_kind == 'char' else {'token_kind': token_kind}
            vocab = load_tokenizer(spec).vocab_size
            if spec['token_kind'] == 'gpt2':
                vocab = max(vocab, config.vocab_size)  # nanoGPT pads 50257 up to 50304 for speed
            model = GPT(dataclasses.replace(config, vocab_size=vocab)).to(device)
            model.tokenizer_spec, named, start_step = spec, None, 0
        optimizer = model.configure_optimizers(weight_decay, learning_rate, betas, torch.device(device).type)
        if named is not None:
            kept, fresh = apply_optimizer_state(model, optimizer, named, fresh_lora)
            print(f'optimizer: state kept for {kept} tensors, fresh for {fresh}')
        return model, optimizer, start_step


def describe_load(ck, report):
    """ one line on what a load did, for logs """
    what = [f'loaded {ck.kind} checkpoint {ck.path} (step {ck.step})']
    if report['merged_source_lora']:
        what.append(f"merged {len(report['merged_source_lora'])} LoRA adapters found in it")
    if report['remapped']:
        what.append(f"{report['remapped']} keys remapped to adapter main weights")
    if report['restored_lora']:
        what.append(f"{len(report['restored_lora'])} adapters restored")
    if report['fresh_lora']:
        what.append(f"{len(report['fresh_lora'])} adapters initialised fresh")
    return '; '.join(what + ck.notes) + (f"\n{report['probe']}" if report.get('probe') else '')


