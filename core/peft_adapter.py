"""
peft's LoRA adapters for transformers' GPT-2 (adapter_config.json + adapter_model.safetensors), both ways.

Our LoRA and peft's compute the same update on the same modules: W x + B A x * lora_alpha / r on attn.c_attn,
attn.c_proj, mlp.c_fc and mlp.c_proj (peft's A and B are nn.Linear factors even over GPT-2's Conv1D layers, so the
factors are ours unchanged), and E + A B^T * lora_alpha / r on the token embedding (peft stores our A transposed).
One difference: our head is tied to the adapted embedding, while peft's embedding LoRA leaves lm_head as the base
table. A LoRA on lm_head made of the same two factors (B = our A, A = our B^T) carries that part, so an export
targets lm_head too, and an import requires exactly that pairing (anything else computes another function).

Nothing here imports peft or transformers: the files are JSON and safetensors. Our tests check them with peft.
"""

import json
import os
import re
from pathlib import Path

from model import CheckpointMismatchError, is_lora_factor, merge_lora_factors, standard_key
from core.commit import CheckpointError, commit_directory, read_safetensors, save_safetensors, write_json
from core.hf import (GPT2_NAMES, export_about, export_state, export_state_file, hf_dir_tokenizer, is_hf_dir, model_card,
                     pretrained_gpt2_dir, read_hf_checkpoint, tokenizer_files, write_hf_dir)
from core.kind import ADAPTER_FILE, STATE_FILE, Checkpoint, Kind, describe_adapters
from core.probe import make_probe
from core.tokenizer import spec_vocab_size

PEFT_CONFIG, PEFT_WEIGHTS = 'adapter_config.json', 'adapter_model.safetensors'
BASE_DIR = 'base' # convert --to peft writes the base model as a Hugging Face GPT-2 directory here
PREFIX = 'base_model.model.' # peft's names: the transformers model's own, under its wrapper
# our adapter settings -> the modules peft targets for them (per block, or of the model)
TARGETS = {'attn_lora_rank': ('attn.c_attn', 'attn.c_proj'), 'mlp_lora_rank': ('mlp.c_fc', 'mlp.c_proj'),
           'embedding_rank': ('wte', 'lm_head')}
BLOCK_MODULE = re.compile(r'transformer\.h\.(\d+)\.((?:attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj))')
# adapter_config.json settings that change what the adapter computes, which this GPT's LoRA cannot: each must be off
UNSUPPORTED = {
    'use_dora': 'DoRA (weight-decomposed LoRA) adds a magnitude vector',
    'use_rslora': 'rsLoRA scales the update by lora_alpha / sqrt(r), this GPT by lora_alpha / r',
    'alpha_pattern': 'a lora_alpha per module; this GPT has one lora_alpha',
    'bias': "trained biases live in the adapter file ('none' is the only setting kept out of it)",
    'lora_bias': 'a bias on the B factor',
    'modules_to_save': 'whole modules trained and saved beside the adapters',
    'layer_replication': 'layers repeated from the base',
    'target_parameters': 'LoRA on parameters rather than modules',
    'trainable_token_indices': 'trained rows of the embedding',
    'alora_invocation_tokens': 'activated LoRA applies the update only after its invocation tokens',
    'use_qalora': 'quantization-aware LoRA', 'use_bdlora': 'block-diagonal factors', 'arrow_config': 'adapter routing',
    'kasa_config': 'another adapter method', 'velora_config': 'another adapter method',
    'monteclora_config': 'another adapter method', 'megatron_config': 'Megatron-parallel layers',
}
# settings that do not change what the saved factors compute (the tensors say which modules and ranks there are)
HARMLESS = ('peft_type', 'task_type', 'r', 'rank_pattern', 'lora_alpha', 'lora_dropout', 'target_modules',
            'exclude_modules', 'layers_to_transform', 'layers_pattern', 'fan_in_fan_out', 'inference_mode',
            'base_model_name_or_path', 'revision', 'peft_version', 'auto_mapping', 'megatron_core', 'qalora_group_size',
            'runtime_config', 'ensure_weight_tying', 'loftq_config', 'eva_config', 'corda_config', 'lora_ga_config')
# init_lora_weights: these start from the base unchanged; PiSSA, OLoRA, CorDA, LoftQ, LoRA-GA move part of the base
# into the factors (and peft redoes that on load), so the saved factors alone do not say what the model computes
PLAIN_INITS = (True, False, 'gaussian', 'eva', 'orthogonal')
OFF = (None, False, 'none', [], {})


def is_peft_dir(path):
    return (Path(path) / PEFT_CONFIG).is_file()


# -----------------------------------------------------------------------------
# export

def write_peft_dir(out_dir, model, write_base, files, base_name=BASE_DIR):
    """
    `model`: our GPT with its LoRA factors. Writes adapter_config.json + adapter_model.safetensors, the base weights
    (the merged weights less the update) through write_base(directory, base_state_dict) into out_dir/base, and
    `files` (name -> a dict, written as JSON, or text) beside them.
    """
    config, sd = model.config, model.state_dict()
    factors = {k: v for k, v in sd.items() if is_lora_factor(k)}
    if not factors:
        raise CheckpointError('the checkpoint has no LoRA adapters to export in peft\'s format (it was trained '
                              'without them, or saved without adapter.pt): export it --to hf instead')
    ranks = {field: getattr(config, 'embedding_lora_rank' if field == 'embedding_rank' else field) for field in TARGETS}
    targets = [t for field, names in TARGETS.items() if ranks[field] for t in names]
    r = next(rank for rank in ranks.values() if rank)
    patterns = {t: ranks[field] for field, names in TARGETS.items() for t in names if ranks[field] not in (0, r)}
    adapter_config = {
        'peft_type': 'LORA', 'task_type': 'CAUSAL_LM', 'r': r, 'lora_alpha': config.lora_alpha,
        'lora_dropout': config.lora_dropout, 'target_modules': targets, 'rank_pattern': patterns, 'alpha_pattern': {},
        'fan_in_fan_out': True, # GPT-2's Conv1D layers; peft turns it off for lm_head, an nn.Linear
        'bias': 'none', 'use_dora': False, 'use_rslora': False, 'modules_to_save': None, 'init_lora_weights': True,
        'inference_mode': True, 'base_model_name_or_path': os.path.abspath(base_name), # for AutoPeftModel
    }
    # the linear layers' factors keep their names (under peft's wrapper); the embedding's are laid out below
    tensors = {PREFIX + k: v for k, v in factors.items() if not k.startswith('transformer.wte.')}
    if ranks['embedding_rank']:
        A, B = sd['transformer.wte.lora_A.weight'], sd['transformer.wte.lora_B.weight'] # A [V, r], B [D, r]
        tensors[f'{PREFIX}transformer.wte.lora_embedding_A'] = A.t()
        tensors[f'{PREFIX}transformer.wte.lora_embedding_B'] = B
        tensors[f'{PREFIX}lm_head.lora_A.weight'] = B.t() # the tied head's share of the update
        tensors[f'{PREFIX}lm_head.lora_B.weight'] = A
    tensors = {k: v.detach().contiguous().clone() for k, v in tensors.items()} # lm_head's share aliases wte's
    base = {standard_key(k): v for k, v in sd.items() if not is_lora_factor(k)}
    base['lm_head.weight'] = base['transformer.wte.weight'] # tied to the base table, as in the model

    def write(directory):
        write_base(Path(directory) / BASE_DIR, base)
        save_safetensors(tensors, str(Path(directory) / PEFT_WEIGHTS))
        write_json(Path(directory) / PEFT_CONFIG, adapter_config)
        for name, content in files.items():
            if isinstance(content, str):
                (Path(directory) / name).write_text(content, encoding='utf-8')
            else:
                write_json(Path(directory) / name, content)
    commit_directory(out_dir, write, replaces=(PEFT_CONFIG, PEFT_WEIGHTS, BASE_DIR, *files))


# -----------------------------------------------------------------------------
# import

def read_adapter(path):
    """
    (our adapter settings, our LoRA factors under our key names, the embedding weights peft saved beside them) of a
    peft LoRA adapter for GPT-2, checked: a setting or module this GPT cannot compute exactly is refused by name.
    """
    path = Path(path)
    if not (path / PEFT_CONFIG).is_file():
        raise CheckpointError(f'{path} is not a peft adapter directory: expected {PEFT_CONFIG} and {PEFT_WEIGHTS} in it, '
                              f'found {", ".join(sorted(p.name for p in path.iterdir())[:8]) or "nothing"}'
                              if path.is_dir() else f'{path} does not exist: expected a peft adapter directory')
    try:
        cfg = json.loads((path / PEFT_CONFIG).read_text(encoding='utf-8'))
    except (OSError, ValueError) as e:
        raise CheckpointError(f'{path / PEFT_CONFIG} could not be read as JSON ({e}); expected peft\'s adapter config') from None
    where = path / PEFT_CONFIG
    if not isinstance(cfg, dict) or cfg.get('peft_type') != 'LORA':
        found = cfg.get('peft_type') if isinstance(cfg, dict) else type(cfg).__name__
        raise CheckpointError(f'{where}: peft_type is {found!r}; only LoRA adapters (peft_type "LORA") can be read')
    for field, value in cfg.items():
        if field in HARMLESS or value in OFF and field != 'init_lora_weights':
            continue
        if field == 'init_lora_weights':
            if value in PLAIN_INITS:
                continue
            what = f'{value!r} initialisation changes the base weights (peft redoes it when loading)'
        else:
            what = UNSUPPORTED.get(field, 'a peft setting this toolkit does not know, so it cannot tell what it changes')
        raise CheckpointError(f'{where}: {field} = {value!r}: {what}. This GPT\'s LoRA computes W + B A * lora_alpha '
                              '/ r on an unchanged base and nothing else, so the adapter cannot be loaded exactly; '
                              f'train it without {field}')
    alpha, dropout = cfg.get('lora_alpha'), cfg.get('lora_dropout', 0.0)
    if not (isinstance(alpha, (int, float)) and alpha > 0) or not (isinstance(dropout, (int, float)) and 0 <= dropout < 1):
        raise CheckpointError(f'{where}: lora_alpha = {alpha!r} and lora_dropout = {dropout!r}; expected a number '
                              'above 0 and a probability below 1')
    if not (path / PEFT_WEIGHTS).is_file():
        raise CheckpointError(f'{path} has an {PEFT_CONFIG} but no {PEFT_WEIGHTS} (adapter_model.bin is pickle; '
                              'save the adapter with safe_serialization=True, peft\'s default)')
    tensors = read_safetensors(path / PEFT_WEIGHTS)
    factors, embedding_bases, head = {}, {}, {}
    for key, value in tensors.items():
        name = key[len(PREFIX):] if key.startswith(PREFIX) else None
        module = name and name.rsplit('.', 2)[0]
        if name and BLOCK_MODULE.fullmatch(module or '') and name.endswith(('.lora_A.weight', '.lora_B.weight')):
            factors[name] = value
        elif name in ('transformer.wte.lora_embedding_A', 'transformer.wte.lora_embedding_B'):
            # peft's embedding factors: A [r, V], B [D, r]; ours: A [V, r] (an embedding), B [D, r] (a linear)
            factors['transformer.wte.lora_' + name[-1] + '.weight'] = value.t() if name.endswith('A') else value
        elif name in ('lm_head.lora_A.weight', 'lm_head.lora_B.weight'):
            head[name[-8]] = value
        elif name in ('transformer.wte.base_layer.weight', 'lm_head.base_layer.weight'):
            embedding_bases[name] = value # peft saves the embedding with its adapter; it must be the base's
        else:
            raise CheckpointError(f'{path / PEFT_WEIGHTS} holds {key}, which this GPT has no place for: its LoRA '
                                  'adapts attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj and the token embedding '
                                  '(with the tied lm_head) only')
    modules = {k.rsplit('.lora_', 1)[0] for k in factors}
    halves = sorted(m for m in modules if not all(f'{m}.lora_{x}.weight' in factors for x in 'AB'))
    if halves:
        raise CheckpointError(f'{path / PEFT_WEIGHTS} holds one of the two LoRA factors of {halves[0]} only: the file '
                              'is incomplete or damaged')
    embedding = 'transformer.wte.lora_A.weight' in factors
    if embedding != bool(head) or (embedding and not (
            head.get('A') is not None and head['A'].shape == factors['transformer.wte.lora_B.weight'].t().shape
            and head['A'].equal(factors['transformer.wte.lora_B.weight'].t()) and head.get('B') is not None
            and head['B'].equal(factors['transformer.wte.lora_A.weight']))):
        raise CheckpointError(f'{path}: this GPT ties its output head to the adapted token embedding, so an embedding '
                              'adapter must come with the same update on lm_head (lm_head.lora_B = wte\'s A '
                              'transposed, lm_head.lora_A = wte\'s B transposed, as convert_checkpoints.py --to peft '
                              'writes it). This adapter has ' + ('an embedding adapter without it' if embedding else
                                                                 'an lm_head adapter of its own') +
                              ': loaded here, it would compute another function')
    settings = {'embedding_mode': 'lora' if embedding else 'standard', 'lora_alpha': float(alpha),
                'lora_dropout': float(dropout), 'lora_train_norms_biases': False}
    for field, names in TARGETS.items():
        kinds = ('wte',) if field == 'embedding_rank' else names
        found = {k: v for k, v in factors.items() if k.endswith('.lora_A.weight') and k.split('.lora_')[0].endswith(kinds)}
        ranks = {(v.shape[1] if field == 'embedding_rank' else v.shape[0]) for v in found.values()}
        if len(ranks) > 1:
            raise CheckpointError(f'{path}: its {field.split("_")[0]} adapters have ranks {sorted(ranks)}; this GPT '
                                  f'has one rank for {" and ".join(names)} of every layer ({field})')
        settings[field] = ranks.pop() if ranks else 0
    return settings, factors, embedding_bases


def find_base(path, base=None):
    """ the base model of a peft adapter directory: given (train.py's init_from), or convert --to peft's path/base.
    base_model_name_or_path is not followed as a path: a name read from a file never leads outside the checkpoint """
    if base:
        return base
    if (Path(path) / BASE_DIR).is_dir():
        return str(Path(path) / BASE_DIR)
    try:
        named = json.loads((Path(path) / PEFT_CONFIG).read_text(encoding='utf-8')).get('base_model_name_or_path')
    except (OSError, ValueError, AttributeError):
        named = None
    if named in GPT2_NAMES:
        return pretrained_gpt2_dir(named) # OpenAI's weights, through the Hugging Face cache
    raise CheckpointError(f'{path} is a peft adapter whose base model ({named!r}) is not here: pass the base Hugging '
                          f'Face GPT-2 directory with it (train.py --init_from=BASE_DIR --adapter_from={path}), or put '
                          f'the base in {Path(path) / BASE_DIR}')
# -----------------------------------------------------------------------------
# the kind

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
    return Checkpoint(path, PEFT, base_ck.config, tokenizer, state.get('step', 0), state.get('best_val_loss'),
                      state, notes, weights=weights, adapters=factors)


def write_peft(ck, model, out, force=False):
    """ the LoRA factors in peft's format, the base (merged weights less the update) as a Hugging Face directory """
    settings = ck.trained_adapters()
    lora, report = ck.build_model(**settings)
    if report['fresh_lora']:
        raise CheckpointError(f'{ck.path} was trained with LoRA, but its factors were not saved with it (no '
                              f'{ADAPTER_FILE}: a deploy-only save), so there are no adapters to export: export it --to hf')
    # the probe of the adapted model: what base + adapter must compute when they are read back
    about = {**export_about(ck), 'probe': make_probe(lora, spec_vocab_size(ck.tokenizer) if ck.tokenizer else None)}
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


PEFT = Kind('peft', 'peft LoRA adapter with its base (Hugging Face GPT-2)', lambda p: p if p.is_dir() and is_peft_dir(p) else None,
            read_peft, write_peft, looks=f'a peft adapter directory ({PEFT_CONFIG} + {PEFT_WEIGHTS})',
            weights_only='a peft adapter holds weights only')
