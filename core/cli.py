"""
What the command-line tools share: how a checkpoint is named on the command line, and how errors end a
run (one clear paragraph on stderr and exit code 1; the traceback only with --debug).
"""

import json
import os
import sys
import time
import traceback

import torch

from model import CheckpointMismatchError
from core.checkpoint import CheckpointError, read_checkpoint
from core.errors import ClearError


class SetupError(ClearError):
    """ a run that cannot start as asked (a device this machine lacks, no wandb login, a prompt file): one paragraph """


# what ends a script in one paragraph: our own, a checkpoint that does not fit the model (model.py stays free of
# core/), and what the operating system says of a file
CLEAR_ERRORS = (ClearError, CheckpointMismatchError, OSError)
DTYPES = ('float32', 'bfloat16', 'float16')
# nanoGPT's default, for every tool: bfloat16 where the GPU has it, else float16 on a GPU (with a GradScaler), else float32
DEFAULT_DTYPE = ('bfloat16' if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else
                 'float16' if torch.cuda.is_available() else 'float32')


def check_device(device, name='--device', fix='--device cpu'):
    """ `name` and `fix` say it the way the tool takes it: '--device' (argparse) or 'device =' (train.py) """
    try:
        torch.device(device)
    except RuntimeError:
        raise SetupError(f"{name} {device!r} is not a torch device: use 'cpu', 'cuda', 'cuda:1' or 'mps'") from None
    if device.startswith('cuda') and not torch.cuda.is_available():
        raise SetupError(f'{name} {device!r}, but this machine has no CUDA GPU that torch can use; pass {fix}')
    if device.startswith('mps') and not torch.backends.mps.is_available():
        raise SetupError(f'{name} {device!r}, but torch has no MPS (Apple GPU) support here; pass {fix}')


def tell_torchrun(message):
    """ under torchrun, the error file it reads for its failure summary (its documented channel from a process) """
    path = os.environ.get('TORCHELASTIC_ERROR_FILE')
    if path:
        with open(path, 'w') as f:
            json.dump({'message': {'message': message, 'extraInfo': {'py_callstack': message,
                                                                     'timestamp': str(int(time.time()))}}}, f)


def start_wandb(project, name, config):
    """ a wandb run, or one clear error when wandb cannot start one (no login on this machine, no network) """
    import wandb # only when asked for
    try:
        return wandb.init(project=project, name=name, config=config)
    except wandb.errors.Error as e:
        raise SetupError(f'wandb logging was asked for, but wandb could not start a run: {e} Log in once with '
                         '`wandb login`, or log without an account with WANDB_MODE=offline in the environment '
                         '(`wandb sync` uploads it later), or leave wandb logging off') from None


def add_checkpoint_args(parser):
    parser.add_argument('path', nargs='?', help='the checkpoint, as convert_checkpoints.py takes it (or --checkpoint)')
    parser.add_argument('--model_name', help='a model under --root (checkpoints/<model_name>)')
    parser.add_argument('--checkpoint', help='a checkpoint: any kind inspect_model.py names (directory or file)')
    parser.add_argument('--legacy_checkpoint', help='a legacy file inside the model directory, e.g. final.pt')
    parser.add_argument('--root', default='checkpoints', help='where --model_name looks (default: checkpoints)')
    parser.add_argument('--meta', help="a vocabulary for legacy checkpoints that don't store one (meta.json or nanoGPT meta.pkl)")
    parser.add_argument('--debug', action='store_true', help='show the full traceback on errors')


def checkpoint_location(args):
    given = [a for a in (args.path, args.checkpoint, args.model_name) if a]
    if len(given) != 1:
        raise CheckpointError('name the checkpoint with exactly one of PATH, --checkpoint PATH or --model_name NAME '
                              f"(found {len(given)}{': ' + ', '.join(given) if given else ''})")
    return args.path or args.checkpoint or os.path.join(args.root, args.model_name)


def open_checkpoint(args):
    return read_checkpoint(checkpoint_location(args), args.legacy_checkpoint, args.meta)


def say_error(error, debug=False):
    """ the one way a clear error reaches the user: 'error: ...' on stderr (under torchrun from the first process
    only, and in torchrun's own error file), the traceback too with debug """
    tell_torchrun(f'error: {error}')
    if os.environ.get('RANK', '0') != '0':
        return
    if debug:
        traceback.print_exception(error)
    print(f'error: {error}', file=sys.stderr, flush=True)


def report_errors(debug=False):
    """ for a script that runs at top level (train.py): a clear error that nothing caught ends it as say_error
    says, with exit code 1; anything else keeps Python's traceback """
    def hook(kind, error, trace):
        if isinstance(error, CLEAR_ERRORS):
            say_error(error, debug)
        else:
            sys.__excepthook__(kind, error, trace)
    sys.excepthook = hook


def run(main, args):
    """ main(args) for a tool with a main function: a clear error ends it as say_error says, with exit code 1 """
    try:
        main(args)
    except CLEAR_ERRORS as e:
        say_error(e, getattr(args, 'debug', False))
        sys.exit(1)
