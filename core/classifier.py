"""
The fine-tuned modded-nanogpt bundles (out_dir/best and out_dir/last): finetune_hindi_xnli.py's classifier and
finetune_xlsum.py's language model. A bundle's file names around a GPTBatched, not a GPT of ours. Their writer,
reader and KINDS rows; the scripts build the models.
"""

import json
from pathlib import Path

from model import modded_lora_state
from core.commit import CheckpointError, check_sizes, commit_directory, load_verified, read_json, save_tensors, write_json
from core.kind import BUNDLE_FILES, CONFIG_FILE, JSON_FILES, STATE_FILE, TOKENIZER_FILE, Checkpoint, Kind

CLASSIFIER_KIND = 'nli_classifier' # what its config.json says it is
MODDED_LM_KIND = 'modded_lm' # finetune_xlsum.py's


def save_classifier(path, model, config, tokenizer_spec, state, optimizer=None):
    """
    Written whole into a hidden sibling directory, then swapped in: the old bundle stays until the new is whole.
    model.pt holds the merged weights under the layout's own keys, with or without LoRA; with the optimizer (last/)
    go the LoRA factors (adapter.pt), for an exact same-config resume.
    """
    merged, factors = modded_lora_state(model)
    def write_files(tmp):
        save_tensors(tmp / 'model.pt', {k: v.detach().cpu() for k, v in merged.items()})
        if factors and optimizer is not None:
            save_tensors(tmp / 'adapter.pt', {k: v.detach().cpu() for k, v in factors.items()})
        write_json(tmp / 'config.json', config)
        write_json(tmp / 'tokenizer.json', tokenizer_spec)
        write_json(tmp / 'training_state.json', state)
        if optimizer is not None:
            save_tensors(tmp / 'optimizer.pt', optimizer.state_dict())
    commit_directory(path, write_files, replaces=BUNDLE_FILES)


def lora_config(args):
    """ a run's adapters (--lora_rank, --lora_alpha) as config.json records them: None for full fine-tuning """
    if not args.lora_rank:
        return None
    return {'rank': args.lora_rank, 'alpha': args.lora_alpha if args.lora_alpha is not None else float(args.lora_rank)}


def read_bundle_tensors(path, name):
    return load_verified(path, name, check_sizes(path, editable=JSON_FILES)) # sizes, then checksum, then load


def load_bundle_weights(path, model):
    """ model.pt into a model built from the bundle's config.json, strictly; a misfit names both files """
    try:
        model.load_state_dict(read_bundle_tensors(path, 'model.pt'))
    except RuntimeError as e:
        raise CheckpointError(f'{path}/model.pt does not fit its config.json: {str(e).splitlines()[0]}') from None
    return model


def config_kind(path):
    """ the "kind" a directory's config.json declares (finetune_hindi_xnli.py writes one), or None """
    try:
        config = json.loads((Path(path) / CONFIG_FILE).read_text(encoding='utf-8'))
        return config.get('kind') if isinstance(config, dict) else None
    except (OSError, ValueError):
        return None # absent or not JSON: the bundle reader names the problem


def finetuned_kind(name, declared, title, looks, instead):
    """ the KINDS row of a fine-tuned modded-nanogpt bundle whose config.json says kind = `declared`: the bundle's
    file names, but a model for a task, not a GPT of ours """
    def read(path, meta_path=None):
        config = read_json(Path(path) / CONFIG_FILE)
        state = read_json(Path(path) / STATE_FILE) if (Path(path) / STATE_FILE).exists() else {}
        tokenizer = read_json(Path(path) / TOKENIZER_FILE) if (Path(path) / TOKENIZER_FILE).exists() else None
        return Checkpoint(path, row, None, tokenizer, state.get('step', 0), None, state, details=config)
    row = Kind(name, title, lambda p: p if p.is_dir() and config_kind(p) == declared else None, read, None, gpt=False,
               looks=looks, instead=instead)
    return row


CLASSIFIER = finetuned_kind('classifier', CLASSIFIER_KIND, 'Fine-tuned classifier (finetune_hindi_xnli.py), not a GPT '
                            'language model', 'a fine-tuned classifier directory',
                            'finetune_hindi_xnli.py --eval_only --checkpoint_path DIR scores it')
MODDED_LM = finetuned_kind('modded_lm', MODDED_LM_KIND, 'Fine-tuned modded-nanogpt language model (finetune_xlsum.py): '
                           'GPTBatched with its LM head', 'a generative fine-tune directory',
                           'finetune_xlsum.py --eval_only --model_ckpt DIR generates from it and scores it')
