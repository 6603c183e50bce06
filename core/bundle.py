"""
Our checkpoint bundle: one directory per checkpoint, written whole by core/commit.py (manifest last, then the swap).

  model.pt             the universal merged weights: a flat dict name -> tensor under standard nanoGPT keys
  config.json          the architecture of those weights (GPTConfig, adapter ranks 0) and a format version
  tokenizer.json       the tokenizer spec (core/tokenizer.py)
  training_state.json  step, best_val_loss, the evaluation of these weights, adapter config, run config, RNG
  optimizer.pt         optional: optimizer state keyed by parameter *name*, so it survives a change of the
                       trainable set (standard <-> LoRA, rank changes)
  adapter.pt           only after LoRA training: the factors, so a resume with the same adapter config
                       continues the same trajectory instead of starting its adapters afresh

Here: the writer (in the foreground or in a thread), the reader, the optimizer state by name, and the random state.
An FSDP run writes the same directory with its tensors as shards (core/sharded.py).
"""

import base64
import os
import threading

import torch

from model import GPTConfig, is_lora_factor, standard_key
from core.commit import (MANIFEST_FILE, CheckpointError, DamagedError, check_sizes, commit_directory, interrupted_save,
                         read_json, save_tensors, verify_file, write_json)
from core.fsdp import is_shard_file, is_sharded, load_optimizer_state
from core.probe import make_probe
from core.tokenizer import spec_vocab_size
from core.kind import (ADAPTER_FILE, BUNDLE_FILES, CONFIG_FILE, FORMAT_VERSION, JSON_FILES, MODEL_FILE, OPTIMIZER_FILE,
                       STATE_FILE, TOKENIZER_FILE, Checkpoint, Kind, adapter_config, config_from_dict, config_to_json)


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
# writing

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
    # what these weights compute on the probe, measured before the save: every load of the bundle compares
    probe = make_probe(model, spec_vocab_size(tokenizer) if tokenizer else None)
    state = training_state(model, step, best_val_loss, val_loss, run_config, extra_state, probe,
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


def wait_for_saves():
    """ until every background save has committed; the first error of one that failed is raised here """
    BACKGROUND_SAVES.wait()


def training_state(model, step, best_val_loss, val_loss, run_config, extra_state, probe=None, **files):
    """ training_state.json: where the run stands, which files hold what, and the probe of these weights """
    return {
        'format_version': FORMAT_VERSION,
        'step': int(step),
        'best_val_loss': None if best_val_loss is None else float(best_val_loss),
        'val_loss': None if val_loss is None else float(val_loss),  # the evaluation of exactly these weights
        **files,
        'adapter': adapter_config(model.config),  # what the run trained with
        'config': run_config or {},
        **(extra_state or {}),
        **({'probe': probe} if probe else {}),
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


# -----------------------------------------------------------------------------
# reading

class BundleCheckpoint(Checkpoint):
    """ our bundle: the weights are model.pt, the optimizer state and LoRA factors files that training_state.json names """

    def stored_weights(self):
        if self._weights is None: # mapped, read when first asked for
            self._weights = self.load_file(MODEL_FILE)
        return self._weights

    def optimizer_state(self, model=None):
        name = self.training_state.get('optimizer_file')
        return self.load_file(name) if name else None

    def adapter_state(self):
        name = self.training_state.get('adapter_file')
        return self.load_file(name) if name else None

    def describe_optimizer(self):
        name = self.training_state.get('optimizer_file')
        return f'{name} (keyed by parameter name)' if name else 'none (deploy-only save)'


def bundle_dir(path):
    if any((path / name).exists() for name in (CONFIG_FILE, MODEL_FILE, MANIFEST_FILE)):
        return path
    return interrupted_save(path) # a crash between the two renames of a commit left the complete one beside


def read_bundle(path, meta_path=None):
    fields = read_bundle_json(path)
    if not (path / MODEL_FILE).exists():
        raise CheckpointError(f'{path / MODEL_FILE} is missing: a checkpoint bundle needs its weights')
    return BundleCheckpoint(path, BUNDLE, **fields)


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


def write_bundle(ck, model, out, force=False):
    """ the bundle means what the checkpoint means: with the factors of its adapters where it has them (a sharded or
    peft checkpoint), and the random state of its next batch, so a resume continues exactly """
    if ck.adapter_state() is not None and GPTConfig(**ck.trained_adapters()).uses_lora:
        model, _ = ck.build_model(**ck.trained_adapters())
    save_bundle(out, model, ck.step, ck.optimizer_state(), tokenizer=ck.tokenizer, best_val_loss=ck.best_val_loss,
                val_loss=ck.training_state.get('val_loss'), run_config=ck.training_state.get('config'),
                extra_state={k: ck.training_state[k] for k in ('rng', 'scaler') if k in ck.training_state})


BUNDLE = Kind('bundle', 'New JSON-based format', bundle_dir, read_bundle, write_bundle,
              looks=f'a bundle ({CONFIG_FILE} + {MODEL_FILE})', committed=True)
