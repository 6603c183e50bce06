"""
What the command-line tools share: how a checkpoint is named on the command line, and how errors end a
run (one clear paragraph on stderr and exit code 1; the traceback only with --debug).
"""

import os
import sys
import traceback

import torch

from model import CheckpointMismatchError
from core.checkpoint import CheckpointError, read_checkpoint
from core.tokenizer import TokenizerError

CLEAR_ERRORS = (CheckpointError, CheckpointMismatchError, TokenizerError, OSError)
DTYPES = ('float32', 'bfloat16', 'float16')


def check_device(device):
    try:
        torch.device(device)
    except RuntimeError:
        raise CheckpointError(f"--device {device!r} is not a torch device: use 'cpu', 'cuda', 'cuda:1' or 'mps'") from None
    if device.startswith('cuda') and not torch.cuda.is_available():
        raise CheckpointError(f'--device {device}: this machine has no CUDA GPU that torch can use; pass --device cpu')


def add_checkpoint_args(parser):
    parser.add_argument('--model_name', help='a model under --root (checkpoints/<model_name>)')
    parser.add_argument('--checkpoint', help='a bundle directory, or a directory or file of a legacy checkpoint')
    parser.add_argument('--legacy_checkpoint', help='a legacy file inside the model directory, e.g. final.pt')
    parser.add_argument('--root', default='checkpoints', help='where --model_name looks (default: checkpoints)')
    parser.add_argument('--meta', help="a vocabulary for legacy checkpoints that don't store one (meta.json or nanoGPT meta.pkl)")
    parser.add_argument('--debug', action='store_true', help='show the full traceback on errors')


def checkpoint_location(args):
    if bool(args.model_name) == bool(args.checkpoint):
        raise CheckpointError('name the checkpoint with exactly one of --model_name NAME or --checkpoint PATH')
    return args.checkpoint or os.path.join(args.root, args.model_name)


def open_checkpoint(args):
    return read_checkpoint(checkpoint_location(args), args.legacy_checkpoint, args.meta)


def run(main, args):
    try:
        main(args)
    except CLEAR_ERRORS as e:
        if args.debug:
            traceback.print_exc()
        sys.exit(f'error: {e}')
