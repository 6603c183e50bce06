"""
What train.py and GPT.fit share: the learning-rate schedule, one optimizer step with gradient accumulation,
the evaluation on fixed batches, and the save block. Each is nanoGPT's code, moved here so it exists once.
"""

import math
from contextlib import nullcontext

import torch

from core.bundle import rng_state, save_bundle
from core.sharded import save_sharded


def get_lr(it, learning_rate, warmup_iters, lr_decay_iters, min_lr, decay_lr=True):
    """ nanoGPT's schedule: linear warmup, cosine decay to min_lr, then min_lr """
    if not decay_lr:
        return learning_rate
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if it >= lr_decay_iters: # (at lr_decay_iters the cosine is at min_lr; >= also spares warmup == decay a 0/0)
        return min_lr
    decay_ratio = (it - warmup_iters) / (lr_decay_iters - warmup_iters)
    assert 0 <= decay_ratio <= 1
    coeff = 0.5 * (1.0 + math.cos(math.pi * decay_ratio)) # coeff ranges 0..1
    return min_lr + coeff * (learning_rate - min_lr)


def set_lr(optimizer, lr):
    for param_group in optimizer.param_groups:
        param_group['lr'] = lr


def train_step(model, optimizer, batch, next_batch, grad_accum_steps=1, scaler=None, ctx=nullcontext(),
               grad_clip=1.0, ddp=False):
    """
    One optimizer step over grad_accum_steps micro-batches. `batch` is the (X, Y) already fetched;
    next_batch() fetches the following one while the GPU is busy, as nanoGPT does. Returns
    (loss of the last micro-batch, unscaled by accumulation, as a tensor; the batch prefetched for the next step).
    The loss stays a tensor: reading it (.item()) waits for the GPU, so the caller reads it only when it logs.
    """
    scaler = scaler or torch.amp.GradScaler(enabled=False)
    X, Y = batch
    for micro_step in range(grad_accum_steps):
        if ddp:
            # only sync gradients at the last micro step (the official way is model.no_sync(), same effect)
            model.require_backward_grad_sync = (micro_step == grad_accum_steps - 1)
        elif hasattr(model, 'set_requires_gradient_sync'): # FSDP: reduce-scatter the gradients once, at the last
            model.set_requires_gradient_sync(micro_step == grad_accum_steps - 1)
        with ctx:
            logits, loss = model(X, Y)
            loss = loss / grad_accum_steps # scale the loss to account for gradient accumulation
        # immediately async prefetch next batch while model is doing the forward pass on the GPU
        X, Y = next_batch()
        scaler.scale(loss).backward()
    if grad_clip != 0.0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach() * grad_accum_steps, (X, Y)


@torch.no_grad()
def estimate_loss(model, get_batch, eval_iters, ctx=nullcontext(), seed=1337):
    """
    Mean loss over eval_iters batches per split. The batches come from a generator of their own with a
    fixed seed: every evaluation sees the same data (so a resumed run's first evaluation can be compared
    with the one stored in its checkpoint), and training's random stream is not disturbed.
    """
    out = {}
    model.eval()
    for split in ['train', 'val']:
        generator = torch.Generator().manual_seed(seed)
        losses = torch.zeros(eval_iters)
        for k in range(eval_iters):
            X, Y = get_batch(split, generator)
            with ctx:
                logits, loss = model(X, Y)
            losses[k] = loss.item()
        out[split] = losses.mean().item()
    model.train()
    return out


def save_checkpoint(out_dir, model, optimizer, iter_num, best_val_loss, val_loss, run_config=None,
                    scaler=None, rng=None, background=False, sharded=False, log=print):
    """
    The save block: a bundle of universal merged weights, the optimizer by name, and what an exact resume
    needs (`rng`: the random state from just before the pending batch was drawn, so a resume draws it again).
    sharded=True: an FSDP model, saved by every process as shards of the same checkpoint.
    """
    extra = {'rng': rng or rng_state()}
    if scaler is not None and scaler.is_enabled():
        extra['scaler'] = scaler.state_dict()
    log(f"saving checkpoint to {out_dir}")
    if sharded:
        return save_sharded(out_dir, model, iter_num, optimizer, best_val_loss=best_val_loss, val_loss=val_loss,
                            run_config=run_config, extra_state=extra, background=background)
    return save_bundle(out_dir, model, iter_num, optimizer, best_val_loss=best_val_loss, val_loss=val_loss,
                       run_config=run_config, extra_state=extra, background=background)


def resume_check_line(now, stored, why=''):
    """ what a resumed run prints: its first evaluation beside the val loss stored with its checkpoint """
    return f"resume check: val loss {now:.6f} now, {stored:.6f} stored in the checkpoint (|diff| {abs(now - stored):.1e}{why})"


def read_resume_check(output):
    """ (now, stored) val losses from a run's output, as resume_check_line wrote them """
    line = next(l for l in output.splitlines() if l.startswith('resume check:'))
    words = line.replace(',', '').split()
    return float(words[4]), float(words[6])
