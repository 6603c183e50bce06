"""
Sample from a trained model, with nanoGPT sample.py's options:
$ python generate.py --model_name dante
$ python generate.py --model_name dante --legacy_checkpoint final.pt --start "FILE:prompt.txt"
$ python generate.py --checkpoint out-deploy --num_samples 3 --max_new_tokens 200
"""

from contextlib import nullcontext

import torch

from core.checkpoint import CheckpointError
from core.args import Parser, at_least
from configurator import ConfigError
from core.cli import DEFAULT_DTYPE, DTYPES, SetupError, add_checkpoint_args, check_device, open_checkpoint, run
from core.tokenizer import load_tokenizer


def read_prompt(start):
    """ --start as given, or the text of FILE:path """
    if not start.startswith('FILE:'):
        return start
    path = start[len('FILE:'):]
    try:
        with open(path, encoding='utf-8') as f:
            text = f.read()
    except OSError as e:
        raise SetupError(f'--start FILE:{path}: the prompt file could not be read ({e.strerror}); expected a UTF-8 '
                         'text file') from None
    except UnicodeDecodeError:
        raise SetupError(f'--start FILE:{path}: the prompt file is not UTF-8 text; expected a UTF-8 text file') from None
    if not text:
        raise SetupError(f'--start FILE:{path}: the prompt file is empty; to sample without a prompt, leave --start out')
    return text


def main(args):
    check_device(args.device)
    if not args.temperature > 0:
        raise ConfigError(f'--temperature {args.temperature}: it must be above 0 (1.0 = no change, < 1.0 = less random)')
    start = read_prompt(args.start) # before the model is read: a wrong prompt file is said at once
    ck = open_checkpoint(args)
    if ck.tokenizer is None:
        raise CheckpointError(f'{ck.path} stores no vocabulary, so its tokens cannot be decoded; '
                              'pass --meta data/<dataset>/meta.json (or a nanoGPT meta.pkl)')
    tokenizer = load_tokenizer(ck.tokenizer)
    torch.manual_seed(args.seed)
    model, _ = ck.build_model(args.device) # refuses a tokenizer with more ids than the model has rows
    model.eval()
    if args.compile:
        model = torch.compile(model)
    device_type = 'cuda' if 'cuda' in args.device else 'cpu'
    ptdtype = getattr(torch, args.dtype)
    ctx = nullcontext() if device_type == 'cpu' else torch.amp.autocast(device_type=device_type, dtype=ptdtype)

    start_ids = tokenizer.encode(start) or [tokenizer.eot_id if tokenizer.eot_id is not None else 0]
    x = torch.tensor(start_ids, dtype=torch.long, device=args.device)[None, ...]
    with torch.no_grad(), ctx:
        for _ in range(args.num_samples):
            y = model.generate(x, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                               vocab_size=tokenizer.vocab_size)
            print(tokenizer.decode(y[0].tolist()))
            print('---------------')


if __name__ == '__main__':
    parser = Parser(description='Sample from a trained model.')
    add_checkpoint_args(parser)
    parser.add_argument('--start', default='\n', help='the prompt, or FILE:path to read it from a file')
    parser.add_argument('--num_samples', type=at_least(1), default=3)
    parser.add_argument('--max_new_tokens', type=at_least(0), default=300)
    parser.add_argument('--temperature', type=float, default=0.8, help='1.0 = no change, < 1.0 = less random')
    parser.add_argument('--top_k', type=at_least(1), default=200, help='keep only the top_k most likely tokens')
    parser.add_argument('--seed', type=at_least(0), default=1337)
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--dtype', choices=DTYPES, default=DEFAULT_DTYPE)
    parser.add_argument('--compile', action='store_true')
    run(main, parser.parse_args())
