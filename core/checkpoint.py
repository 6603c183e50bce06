"""
The checkpoint bundle: one directory per checkpoint.

  model.pt             the universal merged weights: a flat dict name -> tensor under standard nanoGPT keys
  config.json          the architecture of those weights (GPTConfig, adapter ranks 0) and a format version
  tokenizer.json       the tokenizer spec (core/tokenizer.py)
  training_state.json  step, best_val_loss, the evaluation of these weights, adapter config, run config, RNG
  optimizer.pt         optional: optimizer state keyed by parameter *name*, so it survives a change of the
                       trainable set (standard <-> LoRA, rank changes)
  adapter.pt           only after LoRA training: the factors, so a resume with the same adapter config
                       continues the same trajectory instead of starting its adapters afresh

An FSDP run saves the same directory with model.pt, optimizer.pt and adapter.pt written as shards by every
process (core/sharded.py): one more kind in KINDS, read like a bundle.

read_checkpoint(path) takes a bundle, a directory holding a legacy file, or a legacy file (nanoGPT's
ckpt.pt, older latest.pt / final.pt), recognised by content, not name. Nothing here unpickles objects: every
torch.load passes weights_only=True, and nanoGPT's meta.pkl is read by an unpickler that refuses all classes.
"""

import base64
import dataclasses
import difflib
import json
import os
import pickle
import threading
import warnings
from pathlib import Path

import torch

from model import (ADAPTER_FIELDS, ADAPTER_RANKS, GPT, CheckpointMismatchError, GPTConfig, is_lora_factor, load_universal_state_dict,
                   merge_lora_factors, standard_key, standardize_state_dict)
from core.commit import (MANIFEST_FILE, PREVIOUS, SAVING, CheckpointError, DamagedError, check_sizes,
                         commit_directory, complete, interrupted_save, is_plain_name, load_tensors, load_verified,
                         read_json, read_manifest, save_tensors, verify_file, write_json)
from core.interop import (EXPORT_STATE, HF_WEIGHTS, export_hf, export_nanogpt, export_state_file, is_hf_dir, model_card,
                          read_hf, tokenizer_files, write_hf_dir)
from core.peft_adapter import BASE_DIR, PEFT_CONFIG, PEFT_WEIGHTS, find_base, is_peft_dir, read_adapter, write_peft_dir
from core.sharded import (HEAD, METADATA, is_shard_file, is_sharded, is_sharded_dir, load_optimizer_state, on_all_processes,
                          open_shards, read_metadata, read_optimizer, read_part, read_shards_like, save_group, shapes,
                          sharded_tensors, staged_shards, write_shards)
from core.tokenizer import char_spec, load_tokenizer, spec_from_hf_tokenizer, spec_vocab_size

FORMAT_VERSION = 1
MODEL_FILE, CONFIG_FILE, TOKENIZER_FILE = 'model.pt', 'config.json', 'tokenizer.json'
STATE_FILE, OPTIMIZER_FILE, ADAPTER_FILE = 'training_state.json', 'optimizer.pt', 'adapter.pt'
BUNDLE_FILES = (MODEL_FILE, CONFIG_FILE, TOKENIZER_FILE, STATE_FILE, OPTIMIZER_FILE, ADAPTER_FILE)
JSON_FILES = (CONFIG_FILE, TOKENIZER_FILE, STATE_FILE) # readable and editable by hand
LEGACY_NAMES = ('latest.pt', 'final.pt', 'ckpt.pt')  # looked for, in this order, in a directory with no bundle
STANDARD = {f.name: f.default for f in dataclasses.fields(GPTConfig) if f.name in ADAPTER_FIELDS}


# -----------------------------------------------------------------------------
# random state

def b64(tensor):
    return base64.b64encode(tensor.cpu().numpy().tobytes()).decode()


def unb64(text):
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)


def rng_state():
    state = {'torch': b64(torch.get_rng_state())}
    if torch.cuda.is_available():
        state['cuda'] = [b64(s) for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state):
    torch.set_rng_state(unb64(state['torch']))
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([unb64(s) for s in state['cuda']])


# -----------------------------------------------------------------------------
# config.json

def adapter_config(config):
    return {f: getattr(config, f) for f in ADAPTER_FIELDS}


def config_to_json(config):
    """ the architecture of the merged weights: the base fields with every adapter off """
    return {'format_version': FORMAT_VERSION, **dataclasses.asdict(config), **STANDARD}


def config_from_dict(data, source, notes=None):
    """ GPTConfig from a JSON or legacy dict: unknown fields ignored (said in `notes`, else warned), missing ones default """
    fields = {f.name: f for f in dataclasses.fields(GPTConfig)}
    unknown = sorted(k for k in data if k not in fields and k != 'format_version')
    if unknown:
        note = f'{source}: ignoring fields that are not part of GPTConfig: {", ".join(unknown)}'
        notes.append(note) if notes is not None else warnings.warn(note, stacklevel=2)
    kwargs = {}
    for k, v in data.items():
        if k not in fields:
            continue
        want = type(fields[k].default)
        if want is float and type(v) is int:
            v = float(v)
        if type(v) is not want:
            raise CheckpointError(f'{source}: field {k!r} should be a {want.__name__}, found {v!r} ({type(v).__name__})')
        kwargs[k] = v
    try:
        return GPTConfig(**kwargs)
    except ValueError as e:
        raise CheckpointError(f'{source}: {e}') from None


def infer_base_config(state_dict, source='the checkpoint'):
    """ what the weights themselves say about the architecture (all but n_head, which no shape tells) """
    if not isinstance(state_dict, dict) or not all(torch.is_tensor(v) for v in state_dict.values()):
        raise CheckpointError(f'{source}: the weights are not a dict of tensors (found {type(state_dict).__name__})')
    if any(k.endswith(('.attn.qkv_w', '.attn.qkvo_w')) for k in state_dict):
        raise CheckpointError(f'{source} is a modded-nanogpt checkpoint (blocks.N.attn.qkv_w / qkvo_w), not a nanoGPT '
                              f'GPT: check it with python test_checkpoint_loading.py {source}, or fine-tune it with '
                              f'python finetune_hindi_xnli.py --pretrained_ckpt_path {source}')
    sd = standardize_state_dict(state_dict, lora_alpha=1.0)  # the scale does not change shapes
    try:
        wte, wpe = sd['transformer.wte.weight'], sd['transformer.wpe.weight']
        layers = {int(k.split('.')[2]) for k in sd if k.startswith('transformer.h.')}
        return dict(vocab_size=wte.shape[0], n_embd=wte.shape[1], block_size=wpe.shape[0], n_layer=max(layers) + 1,
                    bias='transformer.ln_f.bias' in sd, n_hidden=sd['transformer.h.0.mlp.c_fc.weight'].shape[0])
    except (KeyError, ValueError, IndexError) as e:
        raise CheckpointError(f'{source}: the weights are not a nanoGPT GPT state dict (no {e} key)') from None


# -----------------------------------------------------------------------------
# optimizer state keyed by parameter name

def name_optimizer_state(positional, names):
    """ an optimizer.state_dict() with positions replaced by names (names[i] = parameter at position i) """
    return {'state': {names[i]: s for i, s in positional['state'].items()},
            'param_groups': [{**{k: v for k, v in g.items() if k != 'params'}, 'params': [names[i] for i in g['params']]}
                             for g in positional['param_groups']]}


def named_optimizer_state(model, optimizer):
    """ optimizer state keyed by the standard name of each parameter """
    if isinstance(optimizer, dict):  # a state_dict without its optimizer: it must follow configure_optimizers' order
        names = positional_names(model, optimizer)
        if names is None:
            raise CheckpointError('the optimizer state does not follow configure_optimizers() order for this model; '
                                  'pass the optimizer itself so its parameters can be named')
        return name_optimizer_state(optimizer, names)
    name_of = {id(p): standard_key(n) for n, p in model.named_parameters()}
    return name_optimizer_state(optimizer.state_dict(), [name_of[id(p)] for g in optimizer.param_groups for p in g['params']])


def positional_names(model, positional):
    """ names for a positional state made by configure_optimizers (nanoGPT's order), or None if it doesn't fit """
    groups = model.optimizer_groups()
    if [len(g['params']) for g in positional['param_groups']] != [len(g) for g in groups]:
        return None
    params = [(standard_key(n), p) for g in groups for n, p in g]
    for i, s in positional['state'].items():
        if not (isinstance(i, int) and 0 <= i < len(params)): # a position the file claims, checked before use
            return None
        if 'exp_avg' in s and s['exp_avg'].shape != params[i][1].shape:
            return None
    return [n for n, _ in params]


def apply_optimizer_state(model, optimizer, named, fresh_modules=()):
    """
    Carry state over by name for every parameter that exists in both runs with the same shape; the rest start
    fresh, and so do the factors of adapters the load initialised afresh (`fresh_modules`: their old moments
    belong to factors that are gone). Hyperparameters (lr, weight decay, betas) are the current run's.
    Returns (kept, fresh) counts. A sharded model (FSDP) gets the same choice, sharded like its parameters.
    """
    name_of = {id(p): (n, standard_key(n)) for n, p in model.named_parameters()}
    reset = tuple(f'{m}.lora_' for m in fresh_modules)
    params = [p for g in optimizer.param_groups for p in g['params']]
    state = {}
    for i, p in enumerate(params):
        name = name_of[id(p)][1]
        s = None if reset and name.startswith(reset) else (named or {}).get('state', {}).get(name)
        if s and all(v.shape == p.shape for v in s.values() if torch.is_tensor(v) and v.dim() > 0):
            state[i] = s
    if is_sharded(model):
        load_optimizer_state(model, optimizer, {name_of[id(params[i])][0]: s for i, s in state.items()})
    else:
        optimizer.load_state_dict({'state': state, 'param_groups': optimizer.state_dict()['param_groups']})
    return len(state), len(params) - len(state)


# -----------------------------------------------------------------------------
# writing a bundle

def save_bundle(checkpoint_dir, model, step, optimizer=None, tokenizer=None, best_val_loss=None, val_loss=None,
                run_config=None, extra_state=None, background=False):
    """
    Write a whole bundle. `optimizer` is an optimizer, a positional state_dict made by configure_optimizers, a
    named state, or None (deploy-only save). `extra_state` goes into training_state.json (e.g. rng, scaler).
    background=True: the caller waits only while the state is copied to CPU memory; the write, fsyncs, checksums
    and commit run in a thread, after the previous background save has finished (wait_for_saves() waits for
    them and raises their error, as the next background save does). The bytes on disk are the same.
    """
    # the LoRA merges of a synchronous save run while model.pt is written (a NaN/inf one fails the save: nothing is
    # replaced); a background save merges first, since the training loop goes on changing the weights
    deferred = [] if not background else None
    merged = model.get_merged_state_dict(deferred)
    tokenizer = tokenizer or getattr(model, 'tokenizer_spec', None)
    factors = {k: v for k, v in model.state_dict().items() if is_lora_factor(k)}
    if isinstance(optimizer, dict) and all(isinstance(n, str) for g in optimizer['param_groups'] for n in g['params']):
        named = optimizer
    else:
        named = named_optimizer_state(model, optimizer) if optimizer is not None else None
    state = training_state(model, step, best_val_loss, val_loss, run_config, extra_state,
                           optimizer_file=OPTIMIZER_FILE if named is not None else None,
                           adapter_file=ADAPTER_FILE if factors else None)

    def write_files(directory):
        save = lambda name, obj, deferred=(): save_tensors(os.path.join(directory, name), obj, deferred)
        save(MODEL_FILE, merged, deferred)
        write_json_files(directory, model, tokenizer)
        if factors:
            save(ADAPTER_FILE, factors)
        if named is not None:
            save(OPTIMIZER_FILE, named)
        write_json(os.path.join(directory, STATE_FILE), state) # last: it names the files written before it

    def commit():
        with save_errors(checkpoint_dir):
            # the whole bundle or nothing; the bundle files of the previous save are replaced, not carried over
            commit_directory(checkpoint_dir, write_files, replaces=is_checkpoint_file)

    if not background:
        commit()
        return checkpoint_dir
    # staged: the training loop changes its parameters and moments in place, the thread writes this copy
    merged, factors, named, state = staged(merged), staged(factors), staged(named), staged(state)
    return BACKGROUND_SAVES.start(commit, checkpoint_dir, step)


class BackgroundSaves:
    """ the saves written in a thread while training goes on, one at a time: start(), wait(), and the errors of
    those that failed, raised by the next start() or wait() """

    def __init__(self):
        self.threads, self.errors = [], []

    def start(self, save, checkpoint_dir, step):
        """ save() in a thread, after the previous background save has finished """
        self.wait()
        def run():
            try:
                save()
            except CheckpointError as e: # said by the next save, or at the end of training: it names the step
                self.errors.append(type(e)(f'the save of step {step} (written in the background) failed: {e}'))
            except BaseException as e:
                self.errors.append(e)
        thread = threading.Thread(target=run, name=f'save {checkpoint_dir}') # not a daemon: exit waits for it
        thread.start()
        self.threads.append(thread)
        return checkpoint_dir

    def wait(self):
        """ until every background save has committed; the first error of one that failed is raised here """
        while self.threads:
            self.threads.pop(0).join()
        if self.errors:
            error = self.errors.pop(0)
            self.errors.clear()
            raise error


BACKGROUND_SAVES = BackgroundSaves() # this process's


def training_state(model, step, best_val_loss, val_loss, run_config, extra_state, **files):
    """ training_state.json: where the run stands, and which files hold what """
    return {
        'format_version': FORMAT_VERSION,
        'step': int(step),
        'best_val_loss': None if best_val_loss is None else float(best_val_loss),
        'val_loss': None if val_loss is None else float(val_loss),  # the evaluation of exactly these weights
        **files,
        'adapter': adapter_config(model.config),  # what the run trained with
        'config': run_config or {},
        **(extra_state or {}),
    }


def write_json_files(directory, model, tokenizer, state=None):
    write_json(os.path.join(directory, CONFIG_FILE), config_to_json(model.config))
    if tokenizer is not None:
        write_json(os.path.join(directory, TOKENIZER_FILE), tokenizer)
    if state is not None:
        write_json(os.path.join(directory, STATE_FILE), state)


def is_checkpoint_file(name):
    """ a file that a save replaces: a bundle's or a sharded checkpoint's (a bundle saved over shards, or shards
    saved by 4 processes over those of 8, leave none of the old ones behind) """
    return name in BUNDLE_FILES or is_shard_file(name)


class save_errors:
    """ an OSError of a save (disk full, permissions) as one paragraph that says what is still on disk """

    def __init__(self, checkpoint_dir):
        self.checkpoint_dir = checkpoint_dir

    def __enter__(self):
        return self

    def __exit__(self, kind, error, traceback):
        if isinstance(error, OSError):
            raise CheckpointError(f'saving the checkpoint to {self.checkpoint_dir} failed: {error}. {self.checkpoint_dir} '
                                  'holds the last complete checkpoint (the previous one, unless the failure came after '
                                  'the swap).') from None


def save_sharded(checkpoint_dir, model, step, optimizer=None, tokenizer=None, best_val_loss=None, val_loss=None,
                 run_config=None, extra_state=None, background=False):
    """
    save_bundle for an FSDP model, called by every process: each writes its shards in parallel into process 0's new
    directory, which process 0 then commits as a whole (manifest last, then the swap), as it does a bundle.
    background=True: as save_bundle's; each process copies its shards to CPU memory, and the write runs in a thread
    whose collectives use a process group of their own (wait_for_saves() in every process waits for it).
    """
    tensors, groups = sharded_tensors(model, optimizer)
    tokenizer = tokenizer or getattr(model, 'tokenizer_spec', None)
    shards = {'processes': torch.distributed.get_world_size(), 'optimizer_groups': groups,
              'parts': sorted({k.split('/', 1)[0] for k in tensors})}
    state = training_state(model, step, best_val_loss, val_loss, run_config, extra_state, optimizer_file=None,
                           adapter_file=None, shards=shards)

    def first(share):
        def write_files(directory):
            write_shards(share(directory), tensors, group)
            write_json_files(directory, model, tokenizer, state)
        with save_errors(checkpoint_dir):
            commit_directory(checkpoint_dir, write_files, replaces=is_checkpoint_file)

    group = None
    if background:
        tensors, group = staged_shards(tensors), save_group()
    def save():
        with save_errors(checkpoint_dir):
            on_all_processes(first, lambda directory: write_shards(directory, tensors, group), group)
    if not background:
        save()
        return checkpoint_dir
    return BACKGROUND_SAVES.start(save, checkpoint_dir, step)


def staged(obj, copies=None):
    """
    A copy in CPU memory of the tensors in a (nested) dict, list or tuple, as torch.save would write them: tensors
    that share memory (the tied head) share their copy, and what holds no tensor is the same object, so the file's
    bytes are the synchronous save's.
    """
    copies = {} if copies is None else copies # id(tensor) -> its copy; storage address -> the storage's copy
    if torch.is_tensor(obj):
        storage = obj.untyped_storage()
        if ('tensor', id(obj)) not in copies:
            if ('storage', storage.data_ptr()) not in copies:
                copies['storage', storage.data_ptr()] = storage.cpu() if storage.device.type != 'cpu' else storage.clone()
            view = torch.empty(0, dtype=obj.dtype)
            copies['tensor', id(obj)] = view.set_(copies['storage', storage.data_ptr()], obj.storage_offset(), obj.shape,
                                                  obj.stride())
        return copies['tensor', id(obj)]
    if isinstance(obj, dict):
        new = {k: staged(v, copies) for k, v in obj.items()}
        return obj if all(new[k] is obj[k] for k in obj) else new
    if isinstance(obj, (list, tuple)):
        new = type(obj)(staged(v, copies) for v in obj)
        return obj if all(n is o for n, o in zip(new, obj)) else new
    return obj


def wait_for_saves():
    """ until every background save has committed; the first error of one that failed is raised here """
    BACKGROUND_SAVES.wait()


# -----------------------------------------------------------------------------
# reading: bundles and legacy files

class Checkpoint:
    """ what a checkpoint holds, read lazily: weights, optimizer and adapters load only when asked for """

    def __init__(self, path, kind, config, tokenizer, step, best_val_loss, training_state, notes=(),
                 weights=None, optimizer=None, lora_alpha=None, manifest=None, details=None, adapters=None):
        self.path, self.kind, self.config, self.tokenizer = str(path), kind, config, tokenizer
        self.step, self.best_val_loss, self.training_state = step, best_val_loss, training_state
        self.notes, self.lora_alpha, self.manifest = list(notes), lora_alpha, manifest
        self.details = details # a checkpoint that is not a GPT: its own config.json, for reports
        self._weights, self._optimizer, self._adapters = weights, optimizer, adapters
        self._checked, self._shards, self._index = False, None, None

    @property
    def title(self):
        return KINDS[self.kind].title

    def require_gpt(self):
        if not KINDS[self.kind].gpt:
            title = KINDS[self.kind].title
            raise CheckpointError(f'{self.path} is a {title[0].lower() + title[1:]}: it holds no GPT language model to '
                                  'train, sample from or convert. inspect_model.py shows what it holds.')

    def file(self, name):
        return os.path.join(self.path, name)

    def shard_parts(self):
        """ the parts a sharded checkpoint holds; other kinds hold none """
        return []

    def loads_shard_by_shard(self, config):
        """ whether a model of `config` can take this checkpoint already sharded (only a sharded one can) """
        return False

    def load_file(self, name):
        if not is_plain_name(name): # training_state.json names its files: they must stay inside the checkpoint
            raise DamagedError(f'{self.file(STATE_FILE)} names {name!r} as one of its files, which is not a plain file '
                               'name inside the checkpoint directory; the checkpoint is damaged')
        return load_verified(self.path, name, self.manifest)

    def weights(self):
        """ the weights, checked against the config (a file's claims are checked before anything is built) """
        self.require_gpt()
        weights = self.stored_weights()
        self.check_config(weights)
        return weights

    def stored_weights(self):
        """ the weights as stored, unchecked: read with the checkpoint, else its model.pt (mapped) """
        if self._weights is None:
            self._weights = self.load_file(MODEL_FILE)
        return self._weights

    def weight_shapes(self):
        """ what config.json is checked against: the weights themselves (mapped: reading them is cheap) """
        return self.stored_weights()

    def check_config(self, weights=None):
        """
        config.json (or a Hugging Face config) may have been edited by hand: a claimed n_layer of 200000 would
        build 200000 blocks before the load noticed. The weights' own shapes say what they are (mmap, or a sharded
        checkpoint's index: cheap), checked once before anything is built.
        """
        self.require_gpt()
        if self._checked:
            return
        inferred = infer_base_config(self.weight_shapes() if weights is None else weights, self.path)
        wrong = [f'{k} {getattr(self.config, k)} (the weights have {v})' for k, v in inferred.items()
                 if getattr(self.config, k) != v]
        if wrong:
            source = os.path.join(self.path, CONFIG_FILE) if os.path.isdir(self.path) else self.path
            raise CheckpointError(f'{source} does not describe its weights: it says ' + ', '.join(wrong) +
                                  '. Was it edited by hand? Restore the values the weights have; nothing was built.')
        self._checked = True

    def optimizer_state(self, model=None):
        """ the named optimizer state, or None when the checkpoint has none (or none we can name) """
        return self._optimizer

    def adapter_state(self):
        """ the LoRA factors, read with the weights (a peft adapter), or None """
        return self._adapters

    def describe_optimizer(self):
        """ what inspect_model.py says of the optimizer state """
        if KINDS[self.kind].weights_only:
            return f'none ({KINDS[self.kind].weights_only})'
        state = self.optimizer_state()
        return f"present for {len(state['state'])} parameter tensors, named by nanoGPT order" if state else 'none usable'

    def trained_adapters(self):
        """ the adapter settings the checkpoint was trained with (training_state.json's), for a model that restores them """
        return {k: v for k, v in (self.training_state.get('adapter') or {}).items() if k in ADAPTER_FIELDS}

    def model_config(self, **adapter_settings):
        """ this checkpoint's base architecture with the given adapter settings (and dropout) laid over it """
        return GPTConfig(**{**dataclasses.asdict(self.config), **adapter_settings})

    def load_into(self, model):
        """ the weights into any adapter layout; adapters restored when the run trained with the same alpha """
        saved = self.training_state.get('adapter') or {}
        same_alpha = saved.get('lora_alpha') == model.config.lora_alpha
        weights, adapters = self.weights_for(model, same_alpha)
        return load_universal_state_dict(model, weights, lora_alpha=self.lora_alpha, source=self.path, adapters=adapters)

    def weights_for(self, model, with_adapters):
        """ (weights, adapters or None) for `model` """
        return self.weights(), self.adapter_state() if with_adapters else None

    def build_model(self, device='cpu', **adapter_settings):
        self.check_config() # before anything is built
        if self.tokenizer is not None and spec_vocab_size(self.tokenizer) > self.config.vocab_size:
            raise CheckpointError(f'{self.path}: its tokenizer produces {spec_vocab_size(self.tokenizer)} ids but the model '
                                  f'has {self.config.vocab_size} embedding rows: tokenizer.json does not belong to these weights')
        model = GPT.on_meta(self.model_config(**adapter_settings)) # no init of weights about to be replaced
        report = self.load_into(model)
        model.tokenizer_spec = self.tokenizer
        return model.to(device), report


class BundleCheckpoint(Checkpoint):
    """ our bundle: the optimizer state and LoRA factors are files that training_state.json names """

    def optimizer_state(self, model=None):
        name = self.training_state.get('optimizer_file')
        return self.load_file(name) if name else None

    def adapter_state(self):
        name = self.training_state.get('adapter_file')
        return self.load_file(name) if name else None

    def describe_optimizer(self):
        name = self.training_state.get('optimizer_file')
        return f'{name} (keyed by parameter name)' if name else 'none (deploy-only save)'


class ShardedCheckpoint(Checkpoint):
    """ a bundle whose tensors are a DCP checkpoint, each process's shards in files of its own (core/sharded.py) """

    def shards(self):
        """ a sharded checkpoint's checked index (its files verified once) """
        if self._shards is None:
            self._shards = open_shards(self.path, self.manifest, self.shard_index())
        return self._shards

    def shard_parts(self):
        """ the parts a sharded checkpoint holds, by DCP's index (training_state.json's list may be edited) """
        return sorted({key.split('/', 1)[0] for key in self.shard_index()[1]})

    def shard_index(self):
        """ DCP's checked index of a sharded checkpoint, read once """
        if self._index is None:
            self._index = read_metadata(self.path, self.manifest)
        return self._index

    def loads_shard_by_shard(self, config):
        """
        whether a model of `config` can take this checkpoint already sharded, each process reading its own shards:
        a checkpoint of at least the model's positions (cropping needs the whole tensor), with either no adapters in
        the model or the very adapters it stored (new factors are initialised from the whole weight)
        """
        if config.block_size < self.config.block_size:
            return False
        return not config.uses_lora or ('adapter' in self.shard_parts() and all(
            getattr(config, k) == v for k, v in self.trained_adapters().items()))

    def stored_weights(self):
        if self._weights is None:
            self._weights = tied(read_part(self.path, self.shards(), 'model'))
        return self._weights

    def weight_shapes(self):
        return tied(shapes(self.shards(), 'model')) # DCP's index: no tensor read

    def optimizer_state(self, model=None):
        """ for a sharded (FSDP) `model`, read sharded like its parameters """
        groups = self.training_state['shards'].get('optimizer_groups')
        if 'optimizer' not in self.shard_parts():
            return None
        if groups is None:
            raise CheckpointError(f'{self.file(STATE_FILE)}: the shards hold an optimizer state, but "shards" names no '
                                  '"optimizer_groups" (its hyperparameters and parameter names; edited by hand?)')
        return read_optimizer(self.path, self.shards(), groups, model)

    def adapter_state(self):
        return read_part(self.path, self.shards(), 'adapter') if 'adapter' in self.shard_parts() else None

    def describe_optimizer(self):
        count = self.training_state['shards'].get('processes')
        return (f"in the shards, keyed by parameter name (saved by {count} process{'es' if count != 1 else ''})"
                if 'optimizer' in self.shard_parts() else 'none (deploy-only save)')

    def weights_for(self, model, with_adapters):
        return self.shards_for(model, with_adapters) if is_sharded(model) else super().weights_for(model, with_adapters)

    def shards_for(self, model, with_adapters):
        """
        For a sharded (FSDP) model: its shards of the weights (and of the factors), each process reading its own
        share. The checkpoint's other tensors (another architecture's) stand in as shapes, so the strict load names them.
        """
        self.check_config()
        params = model.state_dict()
        read = read_shards_like(self.path, self.shards(), 'model', {standard_key(k): v for k, v in params.items()
                                                                    if not is_lora_factor(k) and k != HEAD})
        weights = tied({**shapes(self.shards(), 'model'), **read})
        adapters = None
        if with_adapters and 'adapter' in self.shard_parts():
            adapters = read_shards_like(self.path, self.shards(), 'adapter', {k: v for k, v in params.items() if is_lora_factor(k)})
        return weights, adapters



def read_hf_checkpoint(path, meta_path=None):
    fields, weights = read_hf(path)
    path, notes = Path(path), []
    state = export_state(path, HF_WEIGHTS, notes)
    tokenizer = hf_dir_tokenizer(path)
    if tokenizer is None:
        tokenizer = {'token_kind': 'gpt2'} if fields['vocab_size'] in (50257, 50304) else None
    if meta_path: # a vocabulary named on the command line (--meta) wins
        tokenizer = read_meta_file(meta_path)
        notes.append(f'tokenizer: read from {meta_path}')
    return Checkpoint(path, 'hf', config_from_dict(fields, path), tokenizer, state.get('step', 0),
                      state.get('best_val_loss'), state, notes, weights=weights)


def read_peft(path, meta_path=None, base=None):
    """ a peft LoRA adapter with its base Hugging Face GPT-2: the merged weights (universal, like every checkpoint)
    and the factors, restored by a run with the same adapter settings """
    settings, factors, saved_embeddings = read_adapter(path)
    base_path = find_base(path, base)
    if not is_hf_dir(base_path):
        raise CheckpointError(f'{base_path}, the base model of the peft adapter {path}, '
                              + ('is not a Hugging Face GPT-2 directory (config.json with a model_type, and '
                                 'model.safetensors)' if os.path.exists(base_path) else 'does not exist'))
    base_ck = read_hf_checkpoint(base_path, meta_path)
    weights = dict(base_ck.weights())
    for name, value in saved_embeddings.items():
        ours = weights[name.replace('.base_layer', '')]
        if value.shape != ours.shape or not value.equal(ours):
            raise CheckpointError(f'{path} saved its own {name} (a resized or trained embedding) that differs from the '
                                  f'base model\'s in {base_path}: the adapter belongs to another base')
    for module in sorted({k.rsplit('.lora_', 1)[0] for k in factors}):
        key = f'{module}.weight'
        if key not in weights:
            raise CheckpointError(f'{path} adapts {module}, which the base model in {base_path} does not have '
                                  f'({base_ck.config.n_layer} layers): the adapter belongs to another base')
        try:
            weights[key] = merge_lora_factors(weights[key], factors[f'{module}.lora_A.weight'],
                                              factors[f'{module}.lora_B.weight'], settings['lora_alpha'])
        except CheckpointMismatchError as e:
            raise CheckpointError(f'{path}: the adapter of {module} does not fit the base in {base_path}: {e}') from None
    weights['lm_head.weight'] = weights['transformer.wte.weight'] # tied to the (adapted) embedding
    notes = [f'base model: {base_path}'] + base_ck.notes
    own_base = os.path.realpath(base_path) == os.path.realpath(Path(path) / BASE_DIR)
    # the step and val loss recorded with the adapter (our export's) describe it on its own base only
    state = {**(export_state(path, PEFT_WEIGHTS, notes) if own_base else {}), 'adapter': settings}
    tokenizer = base_ck.tokenizer or hf_dir_tokenizer(path) # our export writes one beside the adapter too
    return Checkpoint(path, 'peft', base_ck.config, tokenizer, state.get('step', 0), state.get('best_val_loss'),
                      state, notes, weights=weights, adapters=factors)


def hf_dir_tokenizer(path):
    """ our spec of the transformers tokenizer.json in a directory (as our exports write it, or anyone's), or None """
    path = Path(path) / 'tokenizer.json'
    return spec_from_hf_tokenizer(read_json(path)) if path.is_file() else None


def export_state(path, weights_name, notes):
    """
    The training_state.json our Hugging Face and peft exports write beside transformers' files (which ignore it):
    the step and val loss of the weights, and the run's config. Used only while the weights are the ones exported
    (their checksum in our manifest): transformers or peft may save new weights into the same directory.
    """
    path = Path(path)
    if not (path / STATE_FILE).is_file():
        return {}
    try:
        verify_file(path, weights_name, read_manifest(path)) # no manifest, or the file not in it: nothing to check
    except DamagedError:
        notes.append(f'{path / weights_name} is not the file this toolkit exported (saved again by another tool, or '
                     f'damaged): the step and val loss in {STATE_FILE} do not describe it and are not used')
        return {}
    state = read_json(path / STATE_FILE)
    if not isinstance(state, dict) or not (isinstance(state.get('step', 0), int) and state.get('step', 0) >= 0):
        raise CheckpointError(f'{path / STATE_FILE}: expected a JSON object whose step is a whole number >= 0, found '
                              f'{str(state)[:80]}')
    return {k: v for k, v in state.items() if k in EXPORT_STATE and (k == 'step' or k == 'config' and isinstance(v, dict)
                                                                   or k != 'config' and isinstance(v, (int, float)))}


def read_classifier(path, meta_path=None):
    """ finetune_hindi_xnli.py's out_dir/best or last: the bundle's file names, but a classifier, not a GPT """
    config = read_json(Path(path) / CONFIG_FILE)
    state = read_json(Path(path) / STATE_FILE) if (Path(path) / STATE_FILE).exists() else {}
    tokenizer = read_json(Path(path) / TOKENIZER_FILE) if (Path(path) / TOKENIZER_FILE).exists() else None
    return Checkpoint(path, 'classifier', None, tokenizer, state.get('step', 0), None, state, details=config)


def config_kind(path):
    """ the "kind" a directory's config.json declares (finetune_hindi_xnli.py writes one), or None """
    try:
        config = json.loads((Path(path) / CONFIG_FILE).read_text(encoding='utf-8'))
        return config.get('kind') if isinstance(config, dict) else None
    except (OSError, ValueError):
        return None # absent or not JSON: the bundle reader names the problem


def bundle_dir(path):
    if any((path / name).exists() for name in (CONFIG_FILE, MODEL_FILE, MANIFEST_FILE)):
        return path
    return interrupted_save(path) # a crash between the two renames of a commit left the complete one beside


def legacy_file(path):
    if path.is_file():
        return path
    return next((path / name for name in LEGACY_NAMES if (path / name).is_file()), None) if path.is_dir() else None


def sharded_dir(path):
    # its directory, or the complete one a crash between the two renames of a commit left beside it
    found = path if is_sharded_dir(path) else None if path.is_file() else bundle_dir(path)
    return found if found is not None and is_sharded_dir(found) else None


def tied(weights):
    """ a sharded checkpoint stores the tied head once, as the embedding """
    if 'transformer.wte.weight' in weights:
        weights[HEAD] = weights['transformer.wte.weight']
    return weights


def read_sharded(path, meta_path=None):
    ck = ShardedCheckpoint(path, 'sharded', **read_bundle_json(path))
    shards = ck.training_state.get('shards')
    groups = shards.get('optimizer_groups') if isinstance(shards, dict) else None
    if not (isinstance(shards, dict) and isinstance(shards.get('parts'), list) and 'model' in shards['parts']
            and type(shards.get('processes')) is int and shards['processes'] >= 1):
        raise CheckpointError(f'{path / STATE_FILE} does not describe the shards in {path} (its "shards" entry should '
                              f'name the process count and a "model" part, found {str(shards)[:120]}): expected the '
                              'training_state.json that train.py --fsdp=True writes')
    if groups is not None and not (isinstance(groups, list) and all(
            isinstance(g, dict) and isinstance(g.get('params'), list) and all(isinstance(n, str) for n in g['params'])
            for g in groups)):
        raise CheckpointError(f'{path / STATE_FILE}: the "optimizer_groups" of "shards" are not a list of parameter '
                              'groups, each with the names of its "params" (edited by hand?); found {str(groups)[:120]}')
    return ck


def read_bundle(path, meta_path=None):
    fields = read_bundle_json(path)
    if not (path / MODEL_FILE).exists():
        raise CheckpointError(f'{path / MODEL_FILE} is missing: a checkpoint bundle needs its weights')
    return BundleCheckpoint(path, 'bundle', **fields)


def read_bundle_json(path):
    """ what a bundle directory's JSON files say, checked, as Checkpoint's arguments """
    # every listed file there, at its size, else DamagedError naming the file; the JSON files may have been
    # edited by hand (the bundle format invites it for batch_size, device, dropout): they are validated as they are read
    manifest = check_sizes(path, editable=JSON_FILES)
    notes = [] if manifest else ['no manifest.json (written by hand or by an older version): checksums not verified']
    def read(name):
        try:
            verify_file(path, name, manifest)
        except DamagedError:
            notes.append(f'{name} was edited after it was saved (its checksum differs); used as it is now')
        return read_json(path / name)
    if not (path / CONFIG_FILE).exists():
        raise CheckpointError(f'{path / CONFIG_FILE} is missing: a checkpoint bundle needs it')
    config = config_from_dict(read(CONFIG_FILE), path / CONFIG_FILE, notes)
    state = read(STATE_FILE) if (path / STATE_FILE).exists() else {}
    tokenizer = read(TOKENIZER_FILE) if (path / TOKENIZER_FILE).exists() else None
    return dict(config=config, tokenizer=tokenizer, step=state.get('step', 0), best_val_loss=state.get('best_val_loss'),
                training_state=state, notes=notes, manifest=manifest)


def read_legacy(path, meta_path=None):
    """ a single-file checkpoint: nanoGPT's ckpt.pt, an older latest.pt / final.pt, or a bare state dict """
    ck = load_tensors(path, mmap=True) # its optimizer state is only read if a resume asks for it
    if not isinstance(ck, dict):
        raise CheckpointError(f'{path} holds a {type(ck).__name__}, expected a checkpoint dict or a state dict')
    if ck and all(torch.is_tensor(v) for v in ck.values()):
        ck = {'model': ck}  # a bare state dict
    weights = next((ck[k] for k in ('model', 'model_state_dict', 'state_dict') if isinstance(ck.get(k), dict)), None)
    if weights is None:
        raise CheckpointError(f'{path} has no weights: expected a "model" state dict (nanoGPT) among {sorted(ck)[:8]}')
    notes = []
    args = ck.get('model_args') or (ck['config'] if isinstance(ck.get('config'), dict) and 'n_layer' in ck['config'] else {})
    inferred = infer_base_config(weights, path)
    for k, v in inferred.items():
        if k in args and args[k] != v:
            notes.append(f'{k}: the file says {args[k]} but the weights have {v}; using {v}')
    if 'n_head' not in args:
        raise CheckpointError(f'{path} does not record n_head (no model_args), and no tensor shape tells it; '
                              'save it with its model_args, or convert it with an explicit config')
    known = {f.name for f in dataclasses.fields(GPTConfig)} # an older file's config also holds run settings
    config = config_from_dict({**{k: v for k, v in args.items() if k in known}, **inferred, **STANDARD}, path)
    lora_alpha = args.get('lora_alpha')
    run_config = ck.get('config') if isinstance(ck.get('config'), dict) else {}

    tokenizer = legacy_tokenizer(path, ck, run_config, config.vocab_size, meta_path, notes)
    optimizer = None
    if isinstance(ck.get('optimizer'), dict) and ck['optimizer'].get('param_groups'):
        names = positional_names(GPT.on_meta(config), ck['optimizer'])
        if not ck['optimizer'].get('state'): # param groups with no moments: an export of a deploy-only save
            notes.append('the optimizer state is empty (no moments were saved); a resume starts it fresh')
        elif names is None:
            notes.append("the optimizer state does not follow nanoGPT's parameter order; it will start fresh")
        else:
            optimizer = name_optimizer_state(ck['optimizer'], names)
    step = int(ck.get('iter_num', ck.get('step', 0)))
    best = ck.get('best_val_loss')
    best = float(best) if best is not None else None  # nanoGPT stores a 0-d tensor here
    state = {'step': step, 'best_val_loss': best, 'config': run_config,
             'adapter': {f: args[f] for f in ADAPTER_FIELDS if f in args}}
    return Checkpoint(path, 'nanogpt' if 'model_args' in ck else 'legacy', config, tokenizer, step, best, state,
                      notes, weights=weights, optimizer=optimizer, lora_alpha=lora_alpha)


class NoClassesUnpickler(pickle.Unpickler):
    """ reads plain dicts, lists, strings and numbers; any class or function reference is refused """

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f'refusing to load {module}.{name}: meta.pkl should hold only plain values')


def read_meta_pkl(path):
    """ nanoGPT's data/<dataset>/meta.pkl ({'vocab_size', 'itos', 'stoi'}) as a char tokenizer spec """
    try:
        with open(path, 'rb') as f:
            meta = NoClassesUnpickler(f).load()
        return {'token_kind': 'char', 'chars': [meta['itos'][i] for i in range(len(meta['itos']))]}
    except Exception as e:
        raise CheckpointError(f'{path} is not a nanoGPT meta.pkl with an itos vocabulary: {e}') from None


def read_meta_file(path):
    """ the tokenizer spec of a data/<dataset>/meta.json (ours) or meta.pkl (nanoGPT's) """
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f'{path} is a directory; expected a meta.json or nanoGPT meta.pkl vocabulary file '
                              f'(e.g. {path / "meta.json"})')
    if not path.is_file():
        raise CheckpointError(f'{path} does not exist; expected a meta.json or nanoGPT meta.pkl vocabulary')
    if path.suffix != '.json':
        return read_meta_pkl(path)
    meta = read_json(path)
    if not (isinstance(meta, dict) and isinstance(meta.get('tokenizer'), dict)):
        raise CheckpointError(f'{path} has no "tokenizer" entry: expected the meta.json that data/prepare.py writes')
    return meta['tokenizer']


def legacy_tokenizer(path, ck, run_config, vocab_size, meta_path, notes):
    """ the vocabulary of a legacy checkpoint: stored in it, or next to its dataset, like nanoGPT's sample.py """
    if isinstance(ck.get('tokenizer'), dict) and 'token_kind' in ck['tokenizer']:
        return ck['tokenizer']
    if isinstance(ck.get('chars'), list):
        return {'token_kind': 'char', 'chars': ck['chars']}
    if isinstance(ck.get('itos'), dict):
        return {'token_kind': 'char', 'chars': [ck['itos'][i] for i in range(len(ck['itos']))]}
    dataset = run_config.get('dataset')
    dataset = dataset if is_plain_name(dataset) else None # a name from the file: never a path outside data/
    # nanoGPT's sample.py looks in data/<dataset>/ where it runs; also look beside the run (<root>/out/ckpt.pt)
    roots = (Path('data'), Path(path).resolve().parent.parent / 'data', Path(__file__).resolve().parents[1] / 'data')
    candidates = [Path(meta_path)] if meta_path else [Path(path).parent / 'meta.pkl'] + [ # beside: our export's
        d / dataset / name for d in roots if dataset for name in ('meta.json', 'meta.pkl')]
    for p in candidates:
        if p.is_file():
            notes.append(f'tokenizer: read from {p}')
            return read_meta_file(p)
    if vocab_size >= 50257:
        notes.append('tokenizer: gpt2 assumed (no vocabulary stored; nanoGPT\'s sample.py assumes the same)')
        return {'token_kind': 'gpt2'}
    where = f'no meta file for its dataset {dataset!r}' if dataset else 'no dataset named in it'
    notes.append(f'tokenizer: unknown (no vocabulary stored, and {where}); the tools take '
                 '--meta PATH, train.py the vocabulary of its --dataset')
    return None


# -----------------------------------------------------------------------------
# the kinds of checkpoint

@dataclasses.dataclass(frozen=True)
class Kind:
    title: str          # what inspect_model.py calls it
    recognise: object   # Path -> the checkpoint's path, or None; None: named by content (read_legacy decides)
    read: object        # (path, meta_path) -> Checkpoint
    write: object       # (checkpoint, standard model, out path, force) -> None: convert --to NAME; None: no writer
    gpt: bool = True    # False: not a GPT language model; inspected, and refused by train, generate and convert
    looks: str = ''     # what it is on disk, for the message that no checkpoint was found ('' : never read)
    weights_only: str = '' # why it never holds an optimizer state, for inspect_model.py ('': it may hold one)
    committed: bool = False # written whole by core/commit.py: found elsewhere, it is an interrupted save's sibling


def write_bundle(ck, model, out, force=False):
    """ the bundle means what the checkpoint means: with the factors of its adapters where it has them (a sharded or
    peft checkpoint), and the random state of its next batch, so a resume continues exactly """
    if ck.adapter_state() is not None and GPTConfig(**ck.trained_adapters()).uses_lora:
        model, _ = ck.build_model(**ck.trained_adapters())
    save_bundle(out, model, ck.step, ck.optimizer_state(), tokenizer=ck.tokenizer, best_val_loss=ck.best_val_loss,
                val_loss=ck.training_state.get('val_loss'), run_config=ck.training_state.get('config'),
                extra_state={k: ck.training_state[k] for k in ('rng', 'scaler') if k in ck.training_state})


def write_hf(ck, model, out, force=False):
    export_hf(model, out, ck.tokenizer, export_about(ck))


def write_peft(ck, model, out, force=False):
    """ the LoRA factors in peft's format, the base (merged weights less the update) as a Hugging Face directory """
    settings = ck.trained_adapters()
    lora, report = ck.build_model(**settings)
    if report['fresh_lora']:
        raise CheckpointError(f'{ck.path} was trained with LoRA, but its factors were not saved with it (no '
                              f'{ADAPTER_FILE}: a deploy-only save), so there are no adapters to export: export it --to hf')
    about = export_about(ck)
    base = os.path.join(out, BASE_DIR)
    files, _ = tokenizer_files(ck.tokenizer, ck.config.block_size) if ck.tokenizer else ({}, None)
    files[STATE_FILE] = export_state_file(about)
    usage = ['from peft import PeftModel', 'from transformers import GPT2LMHeadModel',
             f"model = PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained('{base}'), '{out}')",
             'merged = model.merge_and_unload()  # a plain GPT2LMHeadModel']
    params = sum(v.numel() for k, v in lora.state_dict().items() if not is_lora_factor(k) and k != 'lm_head.weight')
    files['README.md'] = model_card(lora.config, {**about, 'adapters': describe_adapters(settings)}, params, usage)
    # with an embedding adapter, the base's head is a separate copy of the table: see write_hf_dir
    write_base = lambda directory, weights: write_hf_dir(directory, lora.config, weights, ck.tokenizer,
                                                         {'name': f'The base model of the peft adapter in {out}',
                                                          **{k: about[k] for k in ('source', 'dataset', 'tokenizer')}},
                                                         tied=not lora.config.embedding_lora_rank)
    write_peft_dir(out, lora, write_base, files, base_name=base)


def describe_adapters(adapter):
    """ a training_state's adapter settings in words, for inspect_model.py and model cards """
    try:
        config = GPTConfig(**{k: v for k, v in adapter.items() if k in ADAPTER_FIELDS})
    except (TypeError, ValueError) as e: # training_state.json can be edited by hand
        return f'unreadable adapter settings in training_state.json ({e})'
    ranks = [f'{name} r{getattr(config, key)}' for name, key in ADAPTER_RANKS if getattr(config, key)]
    return f"LoRA {', '.join(ranks)}, alpha {config.lora_alpha}" if ranks else 'none (standard)'


def export_about(ck):
    """ what an export says about its weights: in its training_state.json and model card """
    run = ck.training_state.get('config') or {}
    return {'step': ck.step, 'val_loss': ck.training_state.get('val_loss'), 'best_val_loss': ck.best_val_loss,
            'config': run, 'source': f'{ck.path} ({ck.title})', 'dataset': run.get('dataset'),
            'tokenizer': (ck.tokenizer or {}).get('token_kind')}


def write_nanogpt(ck, model, out, force=False):
    export_nanogpt(model, out, ck.step, ck.best_val_loss, ck.optimizer_state(), ck.tokenizer,
                   run_config=ck.training_state.get('config'), replace_vocabulary=force)


# The one table of checkpoint kinds. Every tool finds, names, reads and writes checkpoints through it, so a kind
# cannot exist in one tool and not another. Recognised in this order: the first row whose recognise() answers.
KINDS = {
    'hf': Kind('Hugging Face GPT-2 directory (transformers)', lambda p: p if p.is_dir() and is_hf_dir(p) else None,
               read_hf_checkpoint, write_hf, looks=f'a Hugging Face GPT-2 directory (config.json + {HF_WEIGHTS})',
               weights_only='a Hugging Face directory holds weights only'),
    'classifier': Kind('Fine-tuned classifier (finetune_hindi_xnli.py), not a GPT language model',
                       lambda p: p if p.is_dir() and config_kind(p) == 'nli_classifier' else None, read_classifier,
                       None, gpt=False, looks='a fine-tuned classifier directory'),
    'peft': Kind('peft LoRA adapter with its base (Hugging Face GPT-2)', lambda p: p if p.is_dir() and is_peft_dir(p) else None,
                 read_peft, write_peft, looks=f'a peft adapter directory ({PEFT_CONFIG} + {PEFT_WEIGHTS})',
                 weights_only='a peft adapter holds weights only'),
    'sharded': Kind('Sharded checkpoint (FSDP, torch.distributed.checkpoint)', sharded_dir, read_sharded, None,
                    looks=f'a sharded checkpoint ({CONFIG_FILE} + {METADATA} + shards)', committed=True),
    'bundle': Kind('New JSON-based format', bundle_dir, read_bundle, write_bundle,
                   looks=f'a bundle ({CONFIG_FILE} + {MODEL_FILE})', committed=True),
    'legacy': Kind('Legacy single file', legacy_file, read_legacy, None,
                   looks=f'a directory holding one of {", ".join(LEGACY_NAMES)}, or a checkpoint file'),
    'nanogpt': Kind('Legacy single file (nanoGPT ckpt.pt)', None, None, write_nanogpt),
}
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
    if kind == 'legacy' and home and home[0] != 'legacy': # e.g. bundle/model.pt: one file of a checkpoint directory
        raise CheckpointError(f'{path} is one file of the checkpoint directory {found_path.parent} '
                              f'({KINDS[home[0]].title}): pass the directory, {found_path.parent}')
    ck = KINDS[kind].read(found_path, meta_path)
    if KINDS[kind].committed and Path(found_path) != Path(path):
        ck.notes.append(f'the last save to {path} was interrupted; read the complete checkpoint it left in {found_path}')
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
    return '; '.join(what + ck.notes)
