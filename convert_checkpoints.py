"""
Convert legacy single-file checkpoints (nanoGPT's ckpt.pt, older latest.pt / final.pt) into bundles, and export
any checkpoint to every kind core/checkpoint.py's KINDS can write (bundle, hf, peft, nanogpt).
The original file is never modified; the bundle is written beside it (or to --out), the optimizer state
comes along (named by parameter), and each conversion is verified by comparing logits before and after.
$ python convert_checkpoints.py                              # every model under checkpoints/
$ python convert_checkpoints.py checkpoints/dante/final.pt out/ckpt.pt
$ python convert_checkpoints.py out/ckpt.pt --out bundles/shakespeare
$ python convert_checkpoints.py out-deploy --to hf hf-model         # transformers' pipeline() and AutoTokenizer read it
$ python convert_checkpoints.py out-lora --to peft peft-adapter     # peft's LoRA adapter, its base in peft-adapter/base
$ python convert_checkpoints.py out-deploy --to nanogpt out/ckpt.pt # nanoGPT's sample.py / train.py read it
"""

import os

import torch

from core.checkpoint import KINDS, LEGACY_NAMES, WRITABLE, CheckpointError, find_checkpoint, read_checkpoint
from core.args import Parser
from core.cli import run

TOLERANCE = 1e-5  # max |logits difference| allowed between the legacy file and its bundle (fp32)


def max_logit_difference(a, b, vocab_size, block_size):
    idx = torch.randint(0, vocab_size, (2, min(block_size, 32)), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return (a(idx, idx)[0].float() - b(idx, idx)[0].float()).abs().max().item()


TARGET = 'bundle' # the kind a conversion writes; the other rows of KINDS are what it reads


def convert(source, out_dir=None, force=False, meta=None):
    ck = read_checkpoint(source, meta_path=meta)
    if ck.kind == TARGET:
        print(f'{source}: already a {TARGET}, nothing to do')
        return None
    if out_dir is None and (os.path.isdir(ck.path) or os.path.dirname(os.path.abspath(ck.path)) == os.getcwd()):
        # a legacy file's bundle goes into its own directory (checkpoints/NAME/); a directory, or a file lying in the
        # current directory, would make that directory (or the parent) the bundle: the output must be named
        raise CheckpointError(f'{source} is a {ck.title}: name where its bundle goes, --out DIR (or --to bundle DIR)'
                              if os.path.isdir(ck.path) else f'{source} lies in the current directory, which is not '
                              'made into a bundle: name where the bundle goes, --out DIR')
    out_dir = out_dir or os.path.dirname(ck.path)
    if os.path.isdir(ck.path) and os.path.realpath(out_dir) == os.path.realpath(ck.path):
        raise CheckpointError(f'--out {out_dir} names the checkpoint being read ({ck.title}): write the bundle into '
                              'another directory (the source is never modified)')
    existing = find_checkpoint(out_dir)
    if existing and existing[0] == TARGET and not force:
        raise CheckpointError(f'{out_dir} already holds a bundle; pass --force to replace it, or --out DIR')
    model, _ = ck.build_model()
    KINDS[TARGET].write(ck, model, out_dir, force)
    reloaded, _ = read_checkpoint(out_dir).build_model()
    diff = max_logit_difference(model.eval(), reloaded.eval(), ck.config.vocab_size, ck.config.block_size)
    if diff > TOLERANCE:
        raise CheckpointError(f'the bundle written to {out_dir} does not reproduce {ck.path}: logits differ by {diff:.2e}')
    print(f"{ck.path} -> {out_dir}: step {ck.step}, "
          f"{'optimizer state kept' if has_optimizer_state(ck) else 'no optimizer state'}, "
          f"tokenizer {ck.tokenizer['token_kind'] if ck.tokenizer else 'unknown'}, "
          f"max |logits difference| {diff:.1e}; original kept")
    for note in ck.notes:
        print(f'  note: {note}')
    return out_dir


def has_optimizer_state(ck):
    state = ck.optimizer_state()
    return bool(state and state.get('state'))


def legacy_sources(root):
    """ the newest-named legacy file of every model directory under root that has no bundle yet """
    sources = []
    for name in sorted(os.listdir(root)) if os.path.isdir(root) else []:
        found = find_checkpoint(os.path.join(root, name))
        if found and found[0] == 'legacy':
            sources.append(str(found[1]))
    return sources


def export(source, fmt, out, meta=None, force=False):
    """ any checkpoint -> any kind KINDS can write (a bundle, a Hugging Face GPT-2 directory, a nanoGPT ckpt.pt),
    checked by reading it back """
    ck = read_checkpoint(source, meta_path=meta)
    if os.path.realpath(out) in (os.path.realpath(ck.path), os.path.realpath(source)):
        raise CheckpointError(f'--to {fmt} {out} names the checkpoint being read: export into another directory (the '
                              'source is never modified)')
    if os.path.exists(out) and not (os.path.isdir(out) and not os.listdir(out)) and not force:
        raise CheckpointError(f'{out} already exists; pass --force to replace it, or name another output')
    model, _ = ck.build_model()
    try:
        KINDS[fmt].write(ck, model, out, force)
    except CheckpointError as e:
        raise CheckpointError(f'{ck.path} -> {out}: {e}') from None
    reread = read_checkpoint(out)
    diff = max_logit_difference(model.eval(), reread.build_model()[0].eval(), ck.config.vocab_size, ck.config.block_size)
    if diff > TOLERANCE:
        raise CheckpointError(f'the {fmt} export in {out} does not reproduce {ck.path}: logits differ by {diff:.2e}')
    print(f'{ck.path} -> {out} ({fmt}): step {ck.step}, '
          f"{'optimizer state kept' if has_optimizer_state(reread) else 'no optimizer state'}, "
          f'max |logits difference| read back {diff:.1e}')
    if fmt == 'nanogpt' and ck.tokenizer and ck.tokenizer.get('token_kind') == 'char':
        dataset = (ck.training_state.get('config') or {}).get('dataset', '<dataset>')
        print(f'  vocabulary: {os.path.join(os.path.dirname(out) or ".", "meta.pkl")}; nanoGPT\'s sample.py reads it '
              f'from data/{dataset}/meta.pkl in the nanoGPT checkout: copy it there')


def main(args):
    if args.to:
        fmt, out = args.to
        if fmt not in WRITABLE:
            raise CheckpointError(f'--to {fmt}: unknown format; it writes {", ".join(WRITABLE)} '
                                  f'(convert_checkpoints.py SOURCE --to hf OUT_DIR)')
        if len(args.paths) != 1:
            raise CheckpointError(f'--to converts exactly one source, found {len(args.paths)} '
                                  f'({" ".join(args.paths) or "none"}): convert_checkpoints.py SOURCE --to {fmt} {out}')
        return export(args.paths[0], fmt, out, args.meta, args.force)
    sources = args.paths or legacy_sources(args.root)
    if not sources:
        print(f'nothing to convert: no legacy checkpoints ({", ".join(LEGACY_NAMES)}) without a bundle under {args.root}')
        return
    if args.out and len(sources) > 1:
        raise CheckpointError('--out takes one source; convert several sources into the directories beside them')
    for source in sources:
        convert(source, args.out, args.force, args.meta)


if __name__ == '__main__':
    parser = Parser(description='Convert legacy checkpoints into bundles (originals kept).')
    parser.add_argument('paths', nargs='*', help='legacy files or directories (default: every model under --root)')
    parser.add_argument('--root', default='checkpoints')
    parser.add_argument('--out', help='where to write the bundle (default: beside the source)')
    parser.add_argument('--force', action='store_true', help='replace a bundle already in the output directory')
    parser.add_argument('--to', nargs=2, metavar=('FORMAT', 'OUT'),
                        help='export instead: bundle OUT_DIR, hf OUT_DIR (transformers GPT2LMHeadModel + tokenizer), peft '
                             'OUT_DIR (a LoRA run\'s adapter, its base in OUT_DIR/base) or nanogpt FILE (its ckpt.pt)')
    parser.add_argument('--meta', help="the vocabulary, for files that don't store one (meta.json or nanoGPT meta.pkl)")
    parser.add_argument('--debug', action='store_true', help='show the full traceback on errors')
    run(main, parser.parse_args())
