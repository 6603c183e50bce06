"""
A Hugging Face GPT-2 directory (config.json + model.safetensors, what transformers.GPT2LMHeadModel.from_pretrained
reads) both ways: its reader, writer and KINDS row, and what our exports write beside transformers' files.

GPT-2's Hugging Face weights come from Conv1D layers, which store the transpose of an nn.Linear weight: that,
the attention mask buffers and the tied head are the whole difference in keys.
"""

import json
import os
from pathlib import Path

from core.commit import (CheckpointError, DamagedError, commit_directory, load_tensors, read_json, read_manifest,
                         read_safetensors, save_safetensors, verify_file, write_json)
from core.kind import STATE_FILE, Checkpoint, Kind, config_from_dict
from core.probe import make_probe
from core.tokenizer import hf_tokenizer, load_tokenizer, spec_from_hf_tokenizer, spec_vocab_size

HF_WEIGHTS = 'model.safetensors' # transformers' file name for the weights

CONV1D = ('attn.c_attn.weight', 'attn.c_proj.weight', 'mlp.c_fc.weight', 'mlp.c_proj.weight')
BIASED = CONV1D + ('ln_1.weight', 'ln_2.weight', 'ln_f.weight') # the layers GPT-2 always gives a bias
HF_BUFFERS = ('.attn.bias', '.attn.masked_bias') # causal masks older transformers saved; not weights
GPT2_EOT = 50256
# the GPT-2 config fields our GPT computes at one value only (transformers' defaults, OpenAI's models): a directory
# with another value would load into a model that computes something else, so it is refused, naming the field
HF_FIXED = {'layer_norm_epsilon': 1e-5, 'scale_attn_weights': True, 'scale_attn_by_inverse_layer_idx': False,
            'reorder_and_upcast_attn': False}


GPT2_NAMES = ('gpt2', 'gpt2-medium', 'gpt2-large', 'gpt2-xl') # nanoGPT's init_from names of OpenAI's weights


def pretrained_gpt2_dir(name):
    """
    The local folder of OpenAI's GPT-2 weights `name` (nanoGPT's init_from='gpt2', ...), found the way transformers'
    from_pretrained finds them: downloaded into the Hugging Face cache when online, read from it when offline.
    """
    try:
        from transformers.utils import cached_file
    except ImportError:
        raise CheckpointError(f"init_from = {name!r} loads OpenAI's GPT-2 weights through Hugging Face transformers, "
                              'which is not installed: pip install transformers') from None
    try:
        config, weights = cached_file(name, 'config.json'), cached_file(name, HF_WEIGHTS)
    except OSError as e:  # transformers' own: offline and not cached, or no network
        raise CheckpointError(f"init_from = {name!r}: OpenAI's GPT-2 weights are neither in the Hugging Face cache nor "
                              f"downloadable here ({str(e).splitlines()[0]}). Online they are downloaded once into the "
                              'cache; offline, use a cache that holds them (HF_HOME), or a directory saved with '
                              f"GPT2LMHeadModel.from_pretrained({name!r}).save_pretrained(DIR), as init_from=DIR") from None
    if os.path.dirname(config) != os.path.dirname(weights):
        raise CheckpointError(f'init_from = {name!r}: the Hugging Face cache holds its config.json and {HF_WEIGHTS} in '
                              f'two places ({config}, {weights}); clear the cache entry and download it again')
    return os.path.dirname(config)


def is_hf_dir(path):
    path = Path(path)
    if not (path / 'config.json').is_file():
        return False
    try:
        return 'model_type' in json.loads((path / 'config.json').read_text())
    except ValueError:
        return False # not JSON: the bundle reader names the problem


# -----------------------------------------------------------------------------
# Hugging Face GPT-2

def with_zero_biases(state_dict):
    """ a bias=False state dict as GPT-2 keys need it: a layer without a bias computes what it computes with a zero one """
    zeros = {k[:-len('weight')] + 'bias': v.new_zeros(v.shape[0]) for k, v in state_dict.items() if k.endswith(BIASED)}
    return {**state_dict, **zeros}


def without_zero_biases(state_dict):
    """ (state dict, bias): every bias zero reads back as bias=False, the model nanoGPT trains by default """
    if any(v.any() for k, v in state_dict.items() if k.endswith('.bias')):
        return state_dict, True
    return {k: v for k, v in state_dict.items() if not k.endswith('.bias')}, False


def hf_config(config, eot=None, tied=True):
    return {'architectures': ['GPT2LMHeadModel'], 'model_type': 'gpt2', 'vocab_size': config.vocab_size,
            'n_positions': config.block_size, 'n_ctx': config.block_size, 'n_embd': config.n_embd,
            'n_layer': config.n_layer, 'n_head': config.n_head,
            'n_inner': None if config.n_hidden == 4 * config.n_embd else config.n_hidden,
            'activation_function': 'gelu_new' if config.activation == 'gelu_tanh' else 'gelu',
            'resid_pdrop': config.dropout, 'embd_pdrop': config.dropout, 'attn_pdrop': config.dropout,
            'layer_norm_epsilon': 1e-5, 'initializer_range': 0.02, 'tie_word_embeddings': tied,
            'bos_token_id': eot, 'eos_token_id': eot}


def tokenizer_files(spec, block_size):
    """ tokenizer.json and tokenizer_config.json that transformers' AutoTokenizer reads (PreTrainedTokenizerFast,
    built by the tokenizers library: nothing downloaded), encoding text to our ids; and the end-of-text id """
    ours = load_tokenizer(spec)
    tokenizer = hf_tokenizer(spec)
    eot = None if ours.eot_id is None else tokenizer.id_to_token(ours.eot_id)
    settings = {'tokenizer_class': 'PreTrainedTokenizerFast', 'model_max_length': block_size,
                'clean_up_tokenization_spaces': False, # transformers would otherwise turn " ." into "." on decode
                **({'bos_token': eot, 'eos_token': eot} if eot else {})}
    return {'tokenizer.json': json.loads(tokenizer.to_str()), 'tokenizer_config.json': settings}, ours.eot_id


def model_card(config, about, params, usage):
    """ README.md: what the model is, how it was trained and how to run it, for people who find the directory """
    about = {k: v for k, v in about.items() if v is not None}
    lines = ['---', 'library_name: transformers', 'pipeline_tag: text-generation', 'tags: [gpt2, nanogpt]', '---', '',
             f"# {about.get('name', 'A nanoGPT-style GPT-2')}", '',
             f'A GPT-2 ({config.n_layer} layers, {config.n_head} heads, {config.n_embd} wide, context '
             f'{config.block_size}, vocabulary {config.vocab_size}, {params / 1e6:.2f}M parameters), exported from '
             f"{about.get('source', 'a nanoGPT-style checkpoint')} by convert_checkpoints.py.", '']
    facts = [('Training steps', about.get('step')), ('Val loss of these weights', about.get('val_loss')),
             ('Best val loss', about.get('best_val_loss')), ('Tokenizer', about.get('tokenizer')),
             ('Dataset', about.get('dataset')), ('Adapters', about.get('adapters'))]
    lines += [f'- {k}: {v:.4f}' if isinstance(v, float) else f'- {k}: {v}' for k, v in facts if v is not None]
    return '\n'.join(lines + ['', '```python', *usage, '```', ''])


HF_FILES = (HF_WEIGHTS, 'config.json', 'generation_config.json', 'tokenizer.json', 'tokenizer_config.json',
            'README.md', 'training_state.json')
EXPORT_STATE = ('step', 'best_val_loss', 'val_loss', 'config', 'probe') # what our training_state.json in an export holds


def export_state_file(about):
    """ training_state.json of an export: what inspect_model.py reports and a resume continues from (transformers
    and peft ignore the file) """
    return {k: about[k] for k in EXPORT_STATE if about.get(k) is not None}


def export_hf(model, out_dir, tokenizer=None, about=None):
    """ the merged weights as a transformers GPT-2 directory: config.json + model.safetensors (the tied head is left
    to transformers to tie), the tokenizer, generation_config.json, a model card, and our training_state.json """
    probe = make_probe(model, spec_vocab_size(tokenizer) if tokenizer else None)  # checked when it is read back
    write_hf_dir(out_dir, model.config, model.get_merged_state_dict(), tokenizer, {**(about or {}), 'probe': probe})
    return out_dir


def write_hf_dir(out_dir, config, state_dict, tokenizer, about, tied=True):
    """ tied=False stores lm_head.weight, a copy of the table, as a model of its own (peft's base for an embedding
    adapter: the adapter's lm_head share then merges into the head alone, not a second time into the table) """
    if not config.bias:
        state_dict = with_zero_biases(state_dict)
    weights = {k: (v.t() if k.endswith(CONV1D) else v).contiguous() for k, v in state_dict.items()
               if k != 'lm_head.weight' or not tied}
    weights = {k: v.clone() if k == 'lm_head.weight' else v for k, v in weights.items()} # safetensors refuses aliases
    files, eot = tokenizer_files(tokenizer, config.block_size) if tokenizer else ({}, None)
    if eot is None and tokenizer is None and config.vocab_size > GPT2_EOT:
        eot = GPT2_EOT # GPT-2's vocabulary assumed, as on reading
    # nanoGPT's sampling defaults (generate.py's and sample.py's), so pipeline() samples as they do
    files['generation_config.json'] = {'bos_token_id': eot, 'eos_token_id': eot, 'do_sample': True,
                                       'temperature': 0.8, 'top_k': 200}
    files['config.json'] = hf_config(config, eot, tied)
    files['training_state.json'] = export_state_file(about)
    usage = ['from transformers import pipeline', f"generate = pipeline('text-generation', model='{out_dir}')",
             f"print(generate({'Hello' if eot is not None else 'The'!r}, max_new_tokens=40)[0]['generated_text'])"]
    card = model_card(config, about, sum(v.numel() for v in weights.values()), usage)

    def write(directory):
        save_safetensors(weights, os.path.join(directory, HF_WEIGHTS))
        for name, content in files.items():
            write_json(os.path.join(directory, name), content)
        Path(directory, 'README.md').write_text(card, encoding='utf-8')
    commit_directory(out_dir, write, replaces=HF_FILES)


def read_hf(path):
    """ (GPTConfig fields, standard nanoGPT state dict) of a local Hugging Face GPT-2 directory """
    path = Path(path)
    cfg = json.loads((path / 'config.json').read_text())
    if cfg.get('model_type') != 'gpt2':
        raise CheckpointError(f"{path}/config.json is a {cfg.get('model_type')!r} model; only GPT-2 directories can be read")
    activation = {'gelu': 'gelu', 'gelu_new': 'gelu_tanh', 'gelu_pytorch_tanh': 'gelu_tanh'}.get(cfg.get('activation_function', 'gelu_new'))
    if activation is None:
        raise CheckpointError(f"{path}/config.json: activation {cfg.get('activation_function')!r} is not a GELU")
    for field, value in HF_FIXED.items():
        if cfg.get(field, value) != value:
            raise CheckpointError(f'{path}/config.json: {field} = {cfg[field]!r}, but this GPT computes only {field} = '
                                  f'{value!r} (as GPT-2 and nanoGPT do): loaded, it would compute another function')
    if (path / HF_WEIGHTS).is_file():
        sd = read_safetensors(path / HF_WEIGHTS)
    elif (path / 'pytorch_model.bin').is_file():
        sd = load_tensors(path / 'pytorch_model.bin')
    else:
        raise CheckpointError(f'{path} has a GPT-2 config.json but no model.safetensors or pytorch_model.bin')
    sd = {k if k.startswith(('transformer.', 'lm_head.')) else f'transformer.{k}': v for k, v in sd.items()
          if not k.endswith(HF_BUFFERS)}
    sd = {k: (v.t() if k.endswith(CONV1D) else v) for k, v in sd.items()}
    if cfg.get('tie_word_embeddings', True) is False: # read exactly when the head is a copy of the table (a peft base)
        head = sd.get('lm_head.weight')
        if head is None or not head.equal(sd['transformer.wte.weight']):
            raise CheckpointError(f"{path}/config.json: tie_word_embeddings = False and lm_head.weight "
                                  f"{'is missing' if head is None else 'differs from the token embedding'}, but this "
                                  'GPT ties its head to the embedding (as GPT-2 and nanoGPT do): loaded, it would compute '
                                  'another function')
    sd.setdefault('lm_head.weight', sd['transformer.wte.weight']) # tied
    sd, bias = without_zero_biases(sd)
    n_inner = cfg.get('n_inner') or 4 * cfg['n_embd']
    fields = dict(vocab_size=cfg['vocab_size'], block_size=cfg['n_positions'], n_embd=cfg['n_embd'],
                  n_layer=cfg['n_layer'], n_head=cfg['n_head'], n_hidden=n_inner, bias=bias, activation=activation,
                  dropout=float(cfg.get('resid_pdrop', 0.0)))
    return fields, sd


# -----------------------------------------------------------------------------
# the kind

def read_hf_checkpoint(path, meta_path=None):
    fields, weights = read_hf(path)
    path, notes = Path(path), []
    state = export_state(path, HF_WEIGHTS, notes)
    tokenizer = hf_dir_tokenizer(path)
    if tokenizer is None:
        tokenizer = {'token_kind': 'gpt2'} if fields['vocab_size'] in (50257, 50304) else None
    return Checkpoint(path, HF, config_from_dict(fields, path), tokenizer, state.get('step', 0),
                      state.get('best_val_loss'), state, notes, weights=weights)


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
    return {k: v for k, v in state.items() if k in EXPORT_STATE and (k == 'step' or k in ('config', 'probe') and
                                                                   isinstance(v, dict) or isinstance(v, (int, float)))}


def export_about(ck):
    """ what an export says about its weights: in its training_state.json and model card """
    run = ck.training_state.get('config') or {}
    return {'step': ck.step, 'val_loss': ck.training_state.get('val_loss'), 'best_val_loss': ck.best_val_loss,
            'config': run, 'source': f'{ck.path} ({ck.title})', 'dataset': run.get('dataset'),
            'tokenizer': (ck.tokenizer or {}).get('token_kind')}


def write_hf(ck, model, out, force=False):
    export_hf(model, out, ck.tokenizer, export_about(ck))


HF = Kind('hf', 'Hugging Face GPT-2 directory (transformers)', lambda p: p if p.is_dir() and is_hf_dir(p) else None,
          read_hf_checkpoint, write_hf, looks=f'a Hugging Face GPT-2 directory (config.json + {HF_WEIGHTS})',
          weights_only='a Hugging Face directory holds weights only')
