"""
What every kind of checkpoint shares: its row in core/checkpoint.py's KINDS (Kind), the Checkpoint it reads, and
config.json with the file names that our bundle, its sharded twin, the classifier and our exports have in common.

Each kind lives in one module with its recogniser, reader, writer and row: core/bundle.py (ours), core/sharded.py
(FSDP), core/hf.py (Hugging Face GPT-2), core/peft_adapter.py (peft), core/nanogpt.py (nanoGPT's ckpt.pt and older
single files), core/classifier.py (finetune_hindi_xnli.py's). core/checkpoint.py lists them in recognition order.
"""

import dataclasses
import os
import warnings

import torch

from model import ADAPTER_FIELDS, ADAPTER_RANKS, GPT, GPTConfig, load_universal_state_dict, standardize_state_dict
from core.commit import CheckpointError, DamagedError, is_plain_name, load_verified
from core.fsdp import is_sharded
from core.probe import check_probe
from core.tokenizer import spec_vocab_size

FORMAT_VERSION = 1
MODEL_FILE, CONFIG_FILE, TOKENIZER_FILE = 'model.pt', 'config.json', 'tokenizer.json'
STATE_FILE, OPTIMIZER_FILE, ADAPTER_FILE = 'training_state.json', 'optimizer.pt', 'adapter.pt'
BUNDLE_FILES = (MODEL_FILE, CONFIG_FILE, TOKENIZER_FILE, STATE_FILE, OPTIMIZER_FILE, ADAPTER_FILE)
JSON_FILES = (CONFIG_FILE, TOKENIZER_FILE, STATE_FILE) # readable and editable by hand
STANDARD = {f.name: f.default for f in dataclasses.fields(GPTConfig) if f.name in ADAPTER_FIELDS}


@dataclasses.dataclass(frozen=True)
class Kind:
    name: str           # its key in KINDS, and what a Checkpoint's .kind says (its .row is this Kind)
    title: str          # what inspect_model.py calls it
    recognise: object   # Path -> the checkpoint's path, or None; None: never found, only named (read_legacy names nanogpt)
    read: object        # (path, meta_path) -> Checkpoint
    write: object       # (checkpoint, standard model, out path, force) -> None: convert --to NAME; None: no writer
    gpt: bool = True    # False: not a GPT language model; inspected, and refused by train, generate and convert
    looks: str = ''     # what it is on disk, for the message that no checkpoint was found ('' : never read)
    weights_only: str = '' # why it never holds an optimizer state, for inspect_model.py ('': it may hold one)
    committed: bool = False # written whole by core/commit.py: found elsewhere, it is an interrupted save's sibling
    instead: str = ''   # gpt=False: the tool that does take it, for the refusal


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


def describe_adapters(adapter):
    """ a training_state's adapter settings in words, for inspect_model.py and model cards """
    try:
        config = GPTConfig(**{k: v for k, v in adapter.items() if k in ADAPTER_FIELDS})
    except (TypeError, ValueError) as e: # training_state.json can be edited by hand
        return f'unreadable adapter settings in training_state.json ({e})'
    ranks = [f'{name} r{getattr(config, key)}' for name, key in ADAPTER_RANKS if getattr(config, key)]
    return f"LoRA {', '.join(ranks)}, alpha {config.lora_alpha}" if ranks else 'none (standard)'


# -----------------------------------------------------------------------------
# what a checkpoint holds

class Checkpoint:
    """ what a checkpoint holds, read lazily: weights, optimizer and adapters load only when asked for """

    def __init__(self, path, kind, config, tokenizer, step, best_val_loss, training_state, notes=(),
                 weights=None, optimizer=None, lora_alpha=None, manifest=None, details=None, adapters=None):
        self.path, self.kind, self.row, self.config, self.tokenizer = str(path), kind.name, kind, config, tokenizer
        self.step, self.best_val_loss, self.training_state = step, best_val_loss, training_state
        self.notes, self.lora_alpha, self.manifest = list(notes), lora_alpha, manifest
        self.details = details # a checkpoint that is not a GPT: its own config.json, for reports
        self._weights, self._optimizer, self._adapters = weights, optimizer, adapters
        self._checked, self._shards, self._index = False, None, None

    @property
    def title(self):
        return self.row.title

    def require_gpt(self):
        if not self.row.gpt:
            title = self.row.title
            raise CheckpointError(f'{self.path} is a {title[0].lower() + title[1:]}, not one of our GPTs: train.py, '
                                  f'generate.py and convert_checkpoints.py do not take it; {self.row.instead} '
                                  '(inspect_model.py shows what it holds)')

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
        """ the weights as stored, unchecked (read with the checkpoint; a bundle maps its model.pt when asked) """
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
        if self.row.weights_only:
            return f'none ({self.row.weights_only})'
        state = self.optimizer_state()
        return f"present for {len(state['state'])} parameter tensors, named by nanoGPT order" if state else 'none usable'

    def trained_adapters(self):
        """ the adapter settings the checkpoint was trained with (training_state.json's), for a model that restores them """
        return {k: v for k, v in (self.training_state.get('adapter') or {}).items() if k in ADAPTER_FIELDS}

    def model_config(self, **adapter_settings):
        """ this checkpoint's base architecture with the given adapter settings (and dropout) laid over it """
        return GPTConfig(**{**dataclasses.asdict(self.config), **adapter_settings})

    def load_into(self, model, probe_check=True, block_size=None):
        """
        The weights into any adapter layout; adapters restored when the run trained with the same alpha; cropped to
        block_size (nanoGPT's crop: the first position embeddings) when it is smaller. Then the checkpoint's probe
        runs on the loaded model (report['probe'] is the line to print); a mismatch raises, unless
        probe_check=False. A model sharded over processes is checked where its shards are gathered.
        """
        saved = self.training_state.get('adapter') or {}
        same_alpha = saved.get('lora_alpha') == model.config.lora_alpha
        weights, adapters = self.weights_for(model, same_alpha)
        report = load_universal_state_dict(model, weights, lora_alpha=self.lora_alpha, source=self.path,
                                           adapters=adapters)
        if block_size is not None and block_size < model.config.block_size:
            model.crop_block_size(block_size)
        if not is_sharded(model):
            into = f'a GPT with adapters {describe_adapters(adapter_config(model.config))}'
            report['probe'] = check_probe(model, self.probe(), f'{self.path} ({self.kind})', into, probe_check)
        return report

    def probe(self):
        """ the probe the checkpoint stores, or None """
        probe = self.training_state.get('probe')
        return probe if isinstance(probe, dict) else None

    def weights_for(self, model, with_adapters):
        """ (weights, adapters or None) for `model` """
        return self.weights(), self.adapter_state() if with_adapters else None

    def build_model(self, device='cpu', probe_check=True, **adapter_settings):
        self.check_config() # before anything is built
        if self.tokenizer is not None and spec_vocab_size(self.tokenizer) > self.config.vocab_size:
            raise CheckpointError(f'{self.path}: its tokenizer produces {spec_vocab_size(self.tokenizer)} ids but the model '
                                  f'has {self.config.vocab_size} embedding rows: tokenizer.json does not belong to these weights')
        model = GPT.on_meta(self.model_config(**adapter_settings)) # no init of weights about to be replaced
        report = self.load_into(model, probe_check)
        model.tokenizer_spec = self.tokenizer
        return model.to(device), report


