"""
Beam search as the modded-nanogpt fork's evaluate_xlsum_generation.py runs it, so that scores stay comparable:
a beam's score is the sum of its tokens' log-probabilities (no length penalty); an ended beam (last token EOS) is
carried as it is; of all candidates the top num_beams are kept (a stable sort: ties keep the fork's order); the
search stops when every beam has ended or max_new_tokens are generated; the best beam's tokens are returned.
Ours runs all beams as one batch over a key/value cache (model.KVCache): each step feeds one token per beam.
beam_search_without_cache is the fork's own way (one beam at a time, the whole prefix recomputed every token),
kept as the reference that tests and bench/bench_generation.py compare with.
"""

import torch
import torch.nn.functional as F

from model import KVCache


def next_candidates(beams, log_probs, num_beams, eos_id, prompt_len):
    """
    The fork's candidate list, best first: beams [(score, tokens)] in order, log_probs (len(beams), V) of each beam's
    next token. An ended beam is one candidate, itself (parent row, no token); a live one gives its top num_beams.
    Returns [(score, parent row, token or None)]; Python floats, so the sums are the fork's double-precision sums.
    """
    top_lp, top_ids = torch.topk(log_probs, k=num_beams, dim=-1)
    top_lp, top_ids = top_lp.tolist(), top_ids.tolist()
    candidates = []
    for row, (score, tokens) in enumerate(beams):
        if ended(tokens, eos_id, prompt_len):
            candidates.append((score, row, None))
        else:
            candidates += [(score + lp, row, tid) for lp, tid in zip(top_lp[row], top_ids[row])]
    candidates.sort(key=lambda c: c[0], reverse=True)
    return candidates[:num_beams]


def ended(tokens, eos_id, prompt_len):
    return eos_id is not None and len(tokens) > prompt_len and tokens[-1] == eos_id


def masked_log_probs(logits, vocab_size):
    """ log-softmax over the tokenizer's ids only: the head's padding rows are never generated """
    logits = logits.float()
    if vocab_size is not None and logits.size(-1) > vocab_size:
        logits = logits.clone()
        logits[:, vocab_size:] = -float('inf')
    return F.log_softmax(logits, dim=-1)


@torch.no_grad()
def beam_search(model, prompt, max_new_tokens, num_beams, eos_id, vocab_size=None):
    """
    The new tokens of the best beam (EOS included if it ended). model(ids (B, T), cache) -> logits (B, T, V);
    the prompt and the new tokens must fit the model's positions (the caller cuts the prompt, never a window).
    """
    device = next(model.parameters()).device
    cache = KVCache(len(prompt) + max_new_tokens)
    logits = model(torch.tensor([prompt], device=device), cache)[:, -1]
    beams = [(0.0, list(prompt))]
    for step in range(max_new_tokens):
        chosen = next_candidates(beams, masked_log_probs(logits, vocab_size), num_beams, eos_id, len(prompt))
        if all(token is None for _, _, token in chosen): # every beam had ended: the fork's stopping rule
            break
        beams = [(score, beams[row][1] + ([] if token is None else [token])) for score, row, token in chosen]
        if step + 1 == max_new_tokens or all(ended(tokens, eos_id, len(prompt)) for _, tokens in beams):
            break # no step left, or none to take: the next logits would never be read
        cache.reorder(torch.tensor([row for _, row, _ in chosen], device=device))
        # an ended beam is fed its EOS again: its row's output is never read, and the rows stay aligned
        last = torch.tensor([[tokens[-1]] for _, tokens in beams], device=device)
        logits = model(last, cache)[:, -1]
    return beams[0][1][len(prompt):]


@torch.no_grad()
def beam_search_without_cache(model, prompt, max_new_tokens, num_beams, eos_id, vocab_size=None):
    """ the fork's search as it runs there: each beam alone, its whole sequence through the model every step """
    device = next(model.parameters()).device
    beams = [(0.0, list(prompt))]
    for _ in range(max_new_tokens):
        rows = [model(torch.tensor([tokens], device=device))[:, -1] for _, tokens in beams]
        chosen = next_candidates(beams, masked_log_probs(torch.cat(rows), vocab_size), num_beams, eos_id, len(prompt))
        if all(token is None for _, _, token in chosen):
            break
        beams = [(score, beams[row][1] + ([] if token is None else [token])) for score, row, token in chosen]
        if all(ended(tokens, eos_id, len(prompt)) for _, tokens in beams):
            break
    return beams[0][1][len(prompt):]
