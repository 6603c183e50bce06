"""
The probe a checkpoint carries, so that a load proves the model it built computes what the saved one did: a few short
token sequences fixed by the vocabulary and the block size, and what the saving model computed on them in float32 and
eval mode, namely the log-probability of each sequence's own next tokens and the logits of the last position's top
entries. One wrong weight anywhere (a transposed matrix, a dropped LoRA scale, a wrong shard) moves these numbers far
beyond the tolerance; merging LoRA factors, another adapter layout or other kernels move them by rounding only.
"""

import torch
import torch.nn.functional as F

from core.commit import CheckpointError

SEQUENCES, LENGTH, TOP = 4, 8, 8  # 4 x 7 next-token log-probabilities + 4 x 8 top logits: 60 values
SEED = 20261208
# |diff| allowed, by the dtype the loaded model computes in: float32 rounding (merges, another layout's matmuls) is
# ~1e-6 on these tiny inputs; a wrong weight moves them by > 1e-1
TOLERANCE = {torch.float32: 1e-3, torch.float64: 1e-3, torch.bfloat16: 1e-1, torch.float16: 5e-2}


class ProbeMismatchError(CheckpointError):
    """ the loaded model does not compute what the saved one did """


def probe_ids(vocab_size, block_size):
    """ the probe's input: SEQUENCES sequences of up to LENGTH ids below vocab_size, the same for every model """
    generator = torch.Generator().manual_seed(SEED)
    return torch.randint(0, vocab_size, (SEQUENCES, min(LENGTH, block_size)), generator=generator)


@torch.no_grad()
def measure(model, ids):
    """ (log-probabilities of each next token [B, T-1], logits of the last position [B, V]) in eval mode """
    training = model.training
    model.eval()
    try:
        logits = model(ids.to(next(model.parameters()).device), every_position=True)[0].float().cpu()
    finally:
        model.train(training)
    next_log_probs = F.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None])[..., 0]
    return next_log_probs, logits[:, -1]


def make_probe(model, vocab_size=None):
    """ the probe of `model` (a GPT) for its checkpoint's JSON; vocab_size: the tokenizer's ids (default: all rows) """
    ids = probe_ids(min(vocab_size or model.config.vocab_size, model.config.vocab_size), model.config.block_size)
    next_log_probs, last = measure(model, ids)
    top = last.topk(min(TOP, last.size(-1)), dim=-1)
    return {'version': 1, 'ids': ids.tolist(), 'next_log_probs': next_log_probs.tolist(),
            'top_ids': top.indices.tolist(), 'top_logits': top.values.tolist()}


def probe_difference(model, probe):
    """ (largest |diff|, number of values compared) of `model` on a stored probe; a model cropped to fewer positions
    than the probe's is compared on its first ones (their next-token log-probabilities) """
    ids, saved = torch.tensor(probe['ids']), torch.tensor(probe['next_log_probs'])
    if model.config.block_size < ids.size(1):
        ids, saved = ids[:, :model.config.block_size], saved[:, :model.config.block_size - 1]
        return (measure(model, ids)[0] - saved).abs().max().item(), saved.numel()
    next_log_probs, last = measure(model, ids)
    ours = torch.cat([next_log_probs.flatten(), last.gather(-1, torch.tensor(probe['top_ids'])).flatten()])
    saved = torch.cat([saved.flatten(), torch.tensor(probe['top_logits']).flatten()])
    return (ours - saved).abs().max().item(), ours.numel()


def check_probe(model, probe, loaded, into, strict=True):
    """
    The line a load prints, after comparing `model` with the stored probe (None: an older checkpoint without one).
    A deviation beyond the tolerance of the model's dtype raises ProbeMismatchError naming it and what was loaded
    (`loaded`) into what (`into`); strict=False (an expert's choice) says so and goes on.
    """
    if probe is None:
        return 'probe: no probe stored (a checkpoint older than probes): the load is not checked'
    diff, count = probe_difference(model, probe)
    dtype = next(model.parameters()).dtype
    tolerance = TOLERANCE.get(dtype, 1e-1)
    if not diff <= tolerance:  # NaN fails too
        message = (f'probe: the model built from {loaded} into {into} does not compute what the saved one did: the '
                   f'largest deviation is {diff:.3g} over {count} values (allowed {tolerance:g} in '
                   f'{str(dtype).replace("torch.", "")}). A weight was loaded wrong or the file was changed after it '
                   'was saved')
        if strict:
            raise ProbeMismatchError(message + '; nothing was trained')
        return message + ' (the probe check is off: going on)'
    return f'probe: |diff| {diff:.1e} over {count} values (the loaded model computes what the saved one did)'
