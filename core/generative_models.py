"""
The two kinds of language model finetune_xlsum.py fine-tunes, each with how it is read (LoRA laid on, and restored
on a resume), run, measured and saved:
- MODDED: a modded-nanogpt pretraining checkpoint as GPTBatched with its pretraining LM head; its fine-tunes are
  bundles of kind modded_lm (core/classifier.py's writer);
- OUR_GPT: our GPT, from any checkpoint core/checkpoint.py reads (train.py's bundles, nanoGPT's ckpt.pt, Hugging
  Face GPT-2); its fine-tunes are our bundles, so generate.py, sample.py and convert_checkpoints.py take them.
family_of(path) says which one a path holds. Each load returns a Loaded; both models are called model(ids, cache)
and give the logits of every position.
"""

import os
from collections import namedtuple

import torch.nn as nn

from load_checkpoint_helper import ModdedCheckpointError, load_pretrained_checkpoint, read_state_dict
from model import GPTBatched, add_modded_lora, set_modded_lora_factors
from core.bundle import apply_optimizer_state, save_bundle
from core.checkpoint import read_checkpoint
from core.classifier import (MODDED_LM_KIND, config_kind, load_bundle_weights, lora_config, read_bundle_tensors,
                             save_classifier)
from core.commit import CheckpointError, read_json, recover
from core.generation_data import SIZES

# model: called model(ids, cache) -> logits; spec: its tokenizer (None: none stored); info: where it came from;
# state: the fine-tune's training_state ({} for a pretrained checkpoint); fresh: LoRA modules that start afresh
Loaded = namedtuple('Loaded', 'model spec info state fresh')


def describe_lora(lora):
    return f"LoRA rank {lora['rank']} alpha {lora['alpha']}" if lora else 'full fine-tuning'


class ModdedLM:
    name = 'modded-nanogpt'

    @staticmethod
    def load(path, args, device, lora):
        """ a pretraining .pt (its LM head kept), or a modded_lm bundle; `lora` laid on (restored when the bundle
        trained with the same) """
        if not os.path.isdir(path):
            heads = args.n_head or (SIZES[args.size][1] if args.size else None)  # the fork's table: heads too
            model, info, _ = load_pretrained_checkpoint(path, device=device, num_heads=heads,
                                                        max_seq_len=args.context_len, lm_head=True)
            keep = ('format', 'num_layers', 'num_heads', 'model_dim', 'head_dim', 'vocab_size', 'step', 'val_loss')
            if lora:
                add_modded_lora(model, lora['rank'], lora['alpha'])
            return Loaded(model, None, {'path': path, **{k: info[k] for k in keep}}, {}, [])
        recover(path)
        config = read_json(os.path.join(path, 'config.json'))
        if args.context_len > config.get('max_seq_len', 0):
            raise CheckpointError(f"--context_len {args.context_len} exceeds the {config.get('max_seq_len')} positions "
                                  f'{path} was built for')
        try:
            model = GPTBatched(config['vocab_size'], config['num_layers'], config['num_heads'], config['model_dim'],
                               config['max_seq_len'], config['head_dim'], config['arch'], config['lm_head_rows'])
        except KeyError as e:
            raise CheckpointError(f'{path}/config.json has no {e} field; expected the config finetune_xlsum.py '
                                  'writes') from None
        load_bundle_weights(path, model)
        state = read_json(os.path.join(path, 'training_state.json'))
        saved, fresh = config.get('lora'), []
        if lora:
            add_modded_lora(model, lora['rank'], lora['alpha'])
        if lora and lora == saved and os.path.exists(os.path.join(path, 'adapter.pt')):
            set_modded_lora_factors(model, read_bundle_tensors(path, 'adapter.pt'))
        elif lora != saved and not args.eval_only:
            print(f'note: {path} was trained with {describe_lora(saved)}, this run asks for {describe_lora(lora)}: the '
                  'merged weights go on with fresh adapters (if any) and a fresh optimizer state')
            fresh = ['all']
        return Loaded(model.to(device), read_json(os.path.join(path, 'tokenizer.json')), config.get('pretrained'),
                      state, fresh)

    @staticmethod
    def shape(model):
        return len(model.blocks), model.num_heads, model.model_dim

    @staticmethod
    def vocab_rows(model):
        return model.embed.num_embeddings

    @staticmethod
    def save(path, model, spec, args, info, state, optimizer=None):
        """ a modded_lm bundle: merged weights under the layout's keys with the head; config.json rebuilds it """
        config = {'format_version': 1, 'kind': MODDED_LM_KIND, 'vocab_size': model.embed.num_embeddings,
                  'lm_head_rows': model.lm_head_w.size(0), 'num_layers': len(model.blocks),
                  'num_heads': model.num_heads, 'model_dim': model.model_dim, 'head_dim': model.head_dim,
                  'max_seq_len': args.context_len, 'arch': model.arch, 'lora': lora_config(args),
                  'representation': args.representation, 'size': args.size, 'prompt_template': args.prompt_template,
                  'target_max_tokens': args.target_max_tokens, 'languages': list(args.languages), 'pretrained': info}
        save_classifier(path, model, config, spec, state, optimizer)

    @staticmethod
    def load_optimizer(optimizer, path, model, fresh):
        """ the saved moments into `optimizer`; False when they belong to other parameters (other adapters) """
        if fresh:
            return False
        optimizer.load_state_dict(read_bundle_tensors(path, 'optimizer.pt'))
        return True


class GPTLogits(nn.Module):
    """ our GPT called as the modded models are: model(ids, cache) -> the logits of every position """

    def __init__(self, gpt):
        super().__init__()
        self.gpt = gpt

    def forward(self, idx, cache=None):
        return self.gpt(idx, cache=cache, every_position=True)[0]


class OurGPT:
    name = 'GPT'

    @staticmethod
    def load(path, args, device, lora):
        """ any GPT checkpoint core/checkpoint.py reads, with `lora` on attention and MLP (a same-alpha bundle's
        adapters restored, as train.py restores them) """
        ck = read_checkpoint(path)
        ck.require_gpt()
        adapters = dict(attn_lora_rank=lora['rank'], mlp_lora_rank=lora['rank'], lora_alpha=lora['alpha']) if lora else {}
        gpt, report = ck.build_model(device, **adapters)
        if args.context_len > gpt.config.block_size:
            raise CheckpointError(f'--context_len {args.context_len} exceeds the {gpt.config.block_size} positions of '
                                  f'{path} (its block_size): lower --context_len')
        state = ck.training_state if 'total_steps' in ck.training_state else {}  # a fine-tune of this script's
        info = state.get('pretrained') or {'path': path, 'kind': ck.kind, 'step': ck.step}
        return Loaded(GPTLogits(gpt), ck.tokenizer, info, state, report['fresh_lora'])

    @staticmethod
    def shape(model):
        c = model.gpt.config
        return c.n_layer, c.n_head, c.n_embd

    @staticmethod
    def vocab_rows(model):
        return model.gpt.config.vocab_size

    @staticmethod
    def save(path, model, spec, args, info, state, optimizer=None):
        """ our bundle (merged weights under nanoGPT keys), this fine-tune's state in its training_state.json """
        val = (state.get('metrics') or {}).get('loss')
        save_bundle(path, model.gpt, state['step'], optimizer, tokenizer=spec, val_loss=val,
                    best_val_loss=(state.get('best') or {}).get('loss'), extra_state={**state, 'pretrained': info})

    @staticmethod
    def load_optimizer(optimizer, path, model, fresh):
        """ the saved moments by parameter name; the new adapters' factors start afresh """
        apply_optimizer_state(model.gpt, optimizer, read_checkpoint(path).optimizer_state(model.gpt), fresh)
        return True


MODDED, OUR_GPT = ModdedLM(), OurGPT()


def family_of(path):
    """ MODDED for a modded-nanogpt pretraining file or a modded_lm bundle, else OUR_GPT (which names what is wrong
    with a path that holds neither) """
    if os.path.isdir(path):
        return MODDED if config_kind(path) == MODDED_LM_KIND else OUR_GPT
    try:
        _, sd = read_state_dict(path)
    except ModdedCheckpointError:
        return OUR_GPT
    return MODDED if any(k.endswith(('.attn.qkv_w', '.attn.qkvo_w')) for k in sd) else OUR_GPT
