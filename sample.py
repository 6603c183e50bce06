"""
nanoGPT's sample.py command line: config files and --key=value through configurator.py, nanoGPT's option names and
defaults. It samples with generate.py's code (one implementation behind both), so it reads every checkpoint kind:
$ python sample.py --out_dir=out-shakespeare-char
$ python sample.py --init_from=gpt2-xl --start="What is the answer to life, the universe, and everything?" \
    --num_samples=5 --max_new_tokens=100
$ python sample.py --out_dir=out-deploy --start=FILE:prompt.txt
"""

import argparse
import sys

import torch

import generate
from configurator import ConfigError, apply_config
from core.cli import DEFAULT_DTYPE, DTYPES, report_errors
from core.hf import GPT2_NAMES, pretrained_gpt2_dir

# -----------------------------------------------------------------------------
config = dict(
    init_from='resume', # 'resume' (the checkpoint in out_dir), a gpt2 variant ('gpt2-xl'), or a checkpoint path
    out_dir='out',
    start='\n', # or "<|endoftext|>" etc. Can also specify a file, use as: "FILE:prompt.txt"
    num_samples=10,
    max_new_tokens=500,
    temperature=0.8, # 1.0 = no change, < 1.0 = less random, > 1.0 = more random
    top_k=200, # retain only the top_k most likely tokens
    seed=1337,
    device='cuda' if torch.cuda.is_available() else 'cpu',
    dtype=DEFAULT_DTYPE,
    compile=False,
    meta=None, # a vocabulary for a checkpoint that stores none: data/<dataset>/meta.json or nanoGPT's meta.pkl
    debug=False, # the traceback of errors that are otherwise one paragraph
)
LEAST = {'num_samples': 1, 'max_new_tokens': 0, 'top_k': 1, 'seed': 0}
# -----------------------------------------------------------------------------


def sample(args):
    for key, least in LEAST.items():
        if getattr(args, key) < least:
            raise ConfigError(f'{key} = {getattr(args, key)} cannot be used: it must be at least {least}')
    if args.dtype not in DTYPES:
        raise ConfigError(f'dtype = {args.dtype!r} cannot be used: it must be one of {", ".join(DTYPES)}')
    where = (args.out_dir if args.init_from == 'resume' else
             pretrained_gpt2_dir(args.init_from) if args.init_from in GPT2_NAMES else args.init_from)
    generate.main(argparse.Namespace(**vars(args), path=None, checkpoint=where, model_name=None, legacy_checkpoint=None,
                                     root='checkpoints'))


if __name__ == '__main__':
    report_errors() # a clear error ends it in one paragraph, exit code 1 (core/cli.py)
    apply_config(config, sys.argv[1:])
    report_errors(config['debug'])
    sample(argparse.Namespace(**config))
