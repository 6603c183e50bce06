"""
The GPT language model, nanoGPT's exactly (same module names, state-dict keys and forward math, so a
nanoGPT ckpt.pt loads and gives the same logits), plus optional LoRA adapters, and the one function that
loads any state dict into a model of any adapter configuration.

Adapters (LoRA, https://arxiv.org/abs/2106.09685):
- LoRALinear replaces an nn.Linear: y = W x + B(A(dropout(x))) * alpha/r, with W under `main_weight`.
- LoRAEmbedding replaces the token embedding: E' = E + A @ B^T * alpha/r.
A checkpoint always stores the *merged* weights under standard keys (get_merged_state_dict), so every
checkpoint is a plain nanoGPT state dict; load_universal_state_dict maps it back onto any adapter layout.
"""

import functools
import math
import os
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F
from torch.nn.utils import parametrize


class LayerNorm(nn.Module):
    """ LayerNorm but with an optional bias. PyTorch doesn't support simply bias=False """

    def __init__(self, ndim, bias):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, input):
        return F.layer_norm(input, self.weight.shape, self.weight, self.bias, 1e-5)


@contextmanager
def meta_device():
    """
    Build modules on the meta device (no memory) without their random init: it does nothing there, and its
    first run imports torch._dynamo (measured: 75 MB of memory and 1.5 s for a load that needs neither).
    """
    names = ('normal_', 'uniform_', 'kaiming_uniform_')
    saved = {name: getattr(nn.init, name) for name in names}
    for name in names:
        setattr(nn.init, name, lambda tensor, *args, **kwargs: tensor)
    try:
        with torch.device('meta'):
            yield
    finally:
        for name, function in saved.items():
            setattr(nn.init, name, function)


# -----------------------------------------------------------------------------
# LoRA layers

class LoRALinear(nn.Module):
    """ nn.Linear plus a low-rank update; the original layer lives on as `main_weight`. """

    def __init__(self, in_features, out_features, bias, rank, alpha, dropout=0.0):
        super().__init__()
        assert rank > 0, "use a plain nn.Linear for rank 0"
        self.rank, self.alpha = rank, alpha
        self.scale = alpha / rank
        self.main_weight = nn.Linear(in_features, out_features, bias=bias)
        self.lora_A = nn.Linear(in_features, rank, bias=False)
        self.lora_B = nn.Linear(rank, out_features, bias=False)
        self.lora_dropout = nn.Dropout(dropout)
        self.reset_lora_parameters()

    def reset_lora_parameters(self):
        # the LoRA paper's init (loralib, peft and litgpt agree): A random, B zero, so the update starts at 0
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x):
        return self.main_weight(x) + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scale


class LoRAEmbedding(nn.Module):
    """ nn.Embedding plus a low-rank update of its table: E' = E + A @ B^T * alpha/r. """

    def __init__(self, num_embeddings, embedding_dim, rank, alpha):
        super().__init__()
        assert rank > 0, "use a plain nn.Embedding for rank 0"
        self.rank, self.alpha = rank, alpha
        self.scale = alpha / rank
        self.main_weight = nn.Embedding(num_embeddings, embedding_dim)
        self.lora_A = nn.Embedding(num_embeddings, rank)
        self.lora_B = nn.Linear(rank, embedding_dim, bias=False)
        self.reset_lora_parameters()

    def reset_lora_parameters(self):
        # the embedding convention (peft, loralib): A zero, B random, so a fresh adapter changes nothing
        nn.init.zeros_(self.lora_A.weight)
        nn.init.normal_(self.lora_B.weight)

    def forward(self, idx):
        return self.main_weight(idx) + self.lora_B(self.lora_A(idx)) * self.scale

    def output_delta(self, x):
        # what the low-rank update adds to a head tied to this table: x @ (A @ B^T)^T, never built as V x D
        return (x @ self.lora_B.weight) @ self.lora_A.weight.t() * self.scale


def make_linear(in_features, out_features, bias, rank, config):
    if rank > 0:
        return LoRALinear(in_features, out_features, bias, rank, config.lora_alpha, config.lora_dropout)
    return nn.Linear(in_features, out_features, bias=bias)


# -----------------------------------------------------------------------------
# the key/value cache: generation runs the model on the new token only, over what earlier positions computed

class KVCache:
    """
    Each attention layer's keys and values (B, heads, positions, head size) for the `length` positions seen so
    far, in buffers of max_len positions allocated on first use (one copy per step is a write, not a new tensor).
    The model's forward fills it and moves `length` on; beam search picks the rows of the chosen beams (reorder).
    """

    def __init__(self, max_len):
        self.max_len, self.length, self.buffers = max_len, 0, {}

    def update(self, layer, k, v):
        """ the new positions' k, v into layer's buffers -> the keys and values of every position so far """
        start, end = self.length, self.length + k.size(2)
        if end > self.max_len:
            raise ValueError(f'the cache holds {self.max_len} positions; {end} were asked for')
        if layer not in self.buffers:
            self.buffers[layer] = tuple(x.new_empty(*x.shape[:2], self.max_len, x.size(3)) for x in (k, v))
        keys, values = self.buffers[layer]
        keys[:, :, start:end], values[:, :, start:end] = k, v
        return keys[:, :, :end], values[:, :, :end]

    def reorder(self, rows):
        """ batch row i becomes old row rows[i] (beams chosen, or one prompt's row repeated for every beam) """
        self.buffers = {layer: (k[rows], v[rows]) for layer, (k, v) in self.buffers.items()}


def causal_attention(q, k, v, cache=None, layer=None, scale=None, dropout_p=0.0):
    """ q (B, H, T, hs) of the last T positions over the keys and values of all positions (the cache's and these) """
    start = cache.length if cache is not None else 0
    if cache is not None:
        k, v = cache.update(layer, k, v)
    T = q.size(2)
    # start 0: plain causal; one new position sees them all; else new position i sees keys 0 .. start + i
    mask = None if start == 0 or T == 1 else torch.ones(T, start + T, dtype=torch.bool, device=q.device).tril(start)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=start == 0,
                                          scale=scale)


# -----------------------------------------------------------------------------
# the transformer

class CausalSelfAttention(nn.Module):

    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        # key, query, value projections for all heads, but in a batch
        self.c_attn = make_linear(config.n_embd, 3 * config.n_embd, config.bias, config.attn_lora_rank, config)
        # output projection
        self.c_proj = make_linear(config.n_embd, config.n_embd, config.bias, config.attn_lora_rank, config)
        self.attn_dropout = nn.Dropout(config.dropout)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout

    def forward(self, x, cache=None):
        B, T, C = x.size() # batch size, sequence length, embedding dimensionality (n_embd)
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) # (B, nh, T, hs)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) # (B, nh, T, hs)
        y = causal_attention(q, k, v, cache, self, dropout_p=self.dropout if self.training else 0)
        y = y.transpose(1, 2).contiguous().view(B, T, C) # re-assemble all head outputs side by side
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.c_fc = make_linear(config.n_embd, config.n_hidden, config.bias, config.mlp_lora_rank, config)
        self.gelu = nn.GELU(approximate='tanh' if config.activation == 'gelu_tanh' else 'none')
        self.c_proj = make_linear(config.n_hidden, config.n_embd, config.bias, config.mlp_lora_rank, config)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, cache=None):
        x = x + self.attn(self.ln_1(x), cache)
        x = x + self.mlp(self.ln_2(x))
        return x


# the fields that define the weights; the rest of GPTConfig is how adapters are laid over them (and dropout)
BASE_FIELDS = ('block_size', 'vocab_size', 'n_layer', 'n_head', 'n_embd', 'bias', 'n_hidden', 'activation')
# the one list of adapter settings: train.py's options, the bundle's training_state, inspect's report derive from it
ADAPTER_FIELDS = ('embedding_mode', 'attn_lora_rank', 'embedding_rank', 'mlp_lora_rank', 'lora_alpha',
                  'lora_dropout', 'lora_train_norms_biases')
# where each rank puts its adapters, for reports: (what it adapts, the rank's field)
ADAPTER_RANKS = (('attention', 'attn_lora_rank'), ('mlp', 'mlp_lora_rank'), ('embedding', 'embedding_lora_rank'))

@dataclass
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 50304 # GPT-2 vocab_size of 50257, padded up to nearest multiple of 64 for efficiency
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True # True: bias in Linears and LayerNorms, like GPT-2. False: a bit better and faster
    n_hidden: int = 0 # MLP width; 0 means nanoGPT's 4 * n_embd
    activation: str = 'gelu' # nanoGPT's exact GELU; 'gelu_tanh' is GPT-2's own ('gelu_new' in transformers)
    # adapters: rank 0 means a plain layer
    embedding_mode: str = 'standard' # 'standard' | 'lora' (LoRA on the token embedding, rank embedding_rank)
    attn_lora_rank: int = 0 # LoRA on attn.c_attn and attn.c_proj
    embedding_rank: int = 0
    mlp_lora_rank: int = 0 # LoRA on mlp.c_fc and mlp.c_proj
    lora_alpha: float = 1.0
    lora_dropout: float = 0.0
    lora_train_norms_biases: bool = False # with adapters on, also train LayerNorms and biases (peft's bias='all')

    def __post_init__(self):
        if self.n_hidden <= 0:
            self.n_hidden = 4 * self.n_embd
        if self.activation not in ('gelu', 'gelu_tanh'):
            raise ValueError(f"activation must be 'gelu' or 'gelu_tanh', got {self.activation!r}")
        if self.embedding_mode not in ('standard', 'lora'):
            raise ValueError(f"embedding_mode must be 'standard' or 'lora', got {self.embedding_mode!r}")
        for name in ('attn_lora_rank', 'embedding_rank', 'mlp_lora_rank'):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")

    @property
    def embedding_lora_rank(self):
        return self.embedding_rank if self.embedding_mode == 'lora' else 0

    @property
    def uses_lora(self):
        return max(self.attn_lora_rank, self.mlp_lora_rank, self.embedding_lora_rank) > 0


class GPT(nn.Module):

    def __init__(self, config):
        super().__init__()
        assert config.vocab_size is not None
        assert config.block_size is not None
        self.config = config

        if config.embedding_lora_rank > 0:
            wte = LoRAEmbedding(config.vocab_size, config.n_embd, config.embedding_lora_rank, config.lora_alpha)
        else:
            wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.transformer = nn.ModuleDict(dict(
            wte = wte,
            wpe = nn.Embedding(config.block_size, config.n_embd),
            drop = nn.Dropout(config.dropout),
            h = nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f = LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # weight tying (https://paperswithcode.com/method/weight-tying). With embedding LoRA the head is tied
        # to the base table and forward() adds the low-rank update, so the head sees the effective embedding.
        self.token_table().weight = self.lm_head.weight

        # init all weights
        self.apply(self._init_weights)
        # apply special scaled init to the residual projections, per GPT-2 paper; the name check covers
        # projections that moved under a LoRA layer's main_weight
        for pn, p in self.named_parameters():
            if pn.endswith('c_proj.weight') or pn.endswith('c_proj.main_weight.weight'):
                torch.nn.init.normal_(p, mean=0.0, std=0.02/math.sqrt(2 * config.n_layer))
        # _init_weights just overwrote the adapters' own init (B = 0 for linears): restore it
        for m in self.modules():
            if isinstance(m, (LoRALinear, LoRAEmbedding)):
                m.reset_lora_parameters()
        self.set_trainable()
        self.tokenizer_spec = None # the tokenizer this model reads (core/tokenizer.py spec), saved with it

    @classmethod
    def on_meta(cls, config):
        """ the model's structure without memory or init: to read names and shapes, or to be filled by assign """
        with meta_device():
            return cls(config)

    def token_table(self):
        """ the nn.Embedding holding the token table (the base table under an embedding adapter) """
        wte = self.transformer.wte
        return wte.main_weight if isinstance(wte, LoRAEmbedding) else wte

    def get_num_params(self, non_embedding=True):
        """
        Return the number of parameters in the model.
        For non-embedding count (default), the position embeddings get subtracted.
        The token embeddings would too, except due to the parameter sharing these
        params are actually used as weights in the final layer, so we include them.
        """
        n_params = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n_params -= self.transformer.wpe.weight.numel()
        return n_params

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def set_trainable(self):
        """
        Without adapters everything trains. With any adapter, only LoRA factors train (peft's bias='none'),
        plus LayerNorms and biases when config.lora_train_norms_biases is set.
        """
        lora = self.config.uses_lora
        for name, p in self.named_parameters():
            is_factor = is_lora_factor(name)
            is_norm_or_bias = name.endswith('.bias') or '.ln_' in name
            p.requires_grad = (not lora) or is_factor or (self.config.lora_train_norms_biases and is_norm_or_bias)

    def forward(self, idx, targets=None, cache=None, every_position=False):
        """ cache: a KVCache holding the positions before idx's (generation), filled with idx's on the way;
        every_position: the logits of every position without targets (a fine-tune with a loss of its own) """
        device = idx.device
        b, t = idx.size()
        start = cache.length if cache is not None else 0
        assert start + t <= self.config.block_size, f"Cannot forward sequence of length {start + t}, block size is only {self.config.block_size}"
        pos = torch.arange(start, start + t, dtype=torch.long, device=device) # shape (t)

        # forward the GPT model itself
        tok_emb = self.transformer.wte(idx) # token embeddings of shape (b, t, n_embd)
        pos_emb = self.transformer.wpe(pos) # position embeddings of shape (t, n_embd)
        x = self.transformer.drop(tok_emb + pos_emb)
        for block in self.transformer.h:
            x = block(x, cache)
        x = self.transformer.ln_f(x)
        if cache is not None:
            cache.length += t

        if targets is None and not every_position:
            # inference-time mini-optimization: only forward the lm_head on the very last position
            x = x[:, [-1], :] # note: using list [-1] to preserve the time dim
        logits = self.lm_head(x)
        if isinstance(self.transformer.wte, LoRAEmbedding):
            logits = logits + self.transformer.wte.output_delta(x)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
        return logits, loss

    def crop_block_size(self, block_size):
        # model surgery to decrease the block size if necessary (the first block_size position embeddings stay)
        if block_size > self.config.block_size:
            raise ValueError(f'cannot crop block_size {self.config.block_size} up to {block_size}')
        self.config.block_size = block_size
        wpe = self.transformer.wpe.weight
        self.transformer.wpe.weight = nn.Parameter(wpe[:block_size].clone(), requires_grad=wpe.requires_grad)

    def get_merged_state_dict(self, deferred=None):
        """
        The universal checkpoint: exactly the keys and shapes of the standard (adapter-free) model of the
        same base config, with every adapter merged in (W + B @ A * alpha/r, in fp32, cast once). The live
        model is not touched; unmerged tensors are shared with it, not copied. deferred: see standardize_state_dict.
        """
        return standardize_state_dict(self.state_dict(), self.config.lora_alpha, deferred)

    def optimizer_groups(self):
        """ nanoGPT's two AdamW groups as (name, param) lists: 2D tensors (matmuls, embeddings) decay,
        biases and norms don't; only parameters that train. Its order is the one nanoGPT's ckpt.pt relies on. """
        params = [(n, p) for n, p in self.named_parameters() if p.requires_grad]
        return [(n, p) for n, p in params if p.dim() >= 2], [(n, p) for n, p in params if p.dim() < 2]

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type, verbose=True):
        decay, nodecay = self.optimizer_groups()
        decay_params, nodecay_params = [p for _, p in decay], [p for _, p in nodecay]
        optim_groups = [
            {'params': decay_params, 'weight_decay': weight_decay},
            {'params': nodecay_params, 'weight_decay': 0.0}
        ]
        num_decay_params = sum(p.numel() for p in decay_params)
        num_nodecay_params = sum(p.numel() for p in nodecay_params)
        if verbose: # train.py: the first process only
            print(f"num decayed parameter tensors: {len(decay_params)}, with {num_decay_params:,} parameters")
            print(f"num non-decayed parameter tensors: {len(nodecay_params)}, with {num_nodecay_params:,} parameters")
        use_fused = device_type == 'cuda'
        return torch.optim.AdamW(optim_groups, lr=learning_rate, betas=betas, fused=use_fused)

    def estimate_mfu(self, fwdbwd_per_iter, dt):
        """ estimate model flops utilization (MFU) in units of A100 bfloat16 peak FLOPS """
        N = self.get_num_params()
        cfg = self.config
        L, H, Q, T = cfg.n_layer, cfg.n_head, cfg.n_embd//cfg.n_head, cfg.block_size
        flops_per_token = 6*N + 12*L*H*Q*T
        flops_per_iter = flops_per_token * T * fwdbwd_per_iter
        flops_achieved = flops_per_iter * (1.0/dt) # per second
        flops_promised = 312e12 # A100 GPU bfloat16 peak flops is 312 TFLOPS
        return flops_achieved / flops_promised

    # the bundle format's notebook-style API: thin calls into core/ (the only imports upward from this file)

    def save(self, checkpoint_dir):
        """ only model.pt: the universal merged weights """
        from core.commit import commit_directory, save_tensors
        from core.kind import MODEL_FILE
        merged = self.get_merged_state_dict()
        commit_directory(checkpoint_dir, lambda d: save_tensors(os.path.join(d, MODEL_FILE), merged), replaces=(MODEL_FILE,))

    def save_checkpoint_bundle(self, checkpoint_dir, step, optimizer_state=None, **state):
        """ the whole bundle; optimizer_state: an optimizer, its state_dict() or a named state """
        from core.bundle import save_bundle
        return save_bundle(checkpoint_dir, self, step, optimizer_state, **state)

    @classmethod
    def load_legacy(cls, path, map_location='cpu'):
        """ a single-file checkpoint -> (model, tokenizer spec, step, named optimizer state or None) """
        from core.checkpoint import read_checkpoint
        ck = read_checkpoint(path)
        model, _ = ck.build_model(map_location)
        return model, ck.tokenizer, ck.step, ck.optimizer_state()

    def fit(self, data_loader, optimizer, max_iters, checkpoint_dir=None, start_step=0, save_interval=None,
            grad_clip=1.0, log_interval=100):
        """
        A small training loop over an iterable of (X, Y) batches, with train.py's step and save code.
        Saves a bundle to checkpoint_dir every save_interval steps and at the end. Returns the losses.
        """
        from core.training import train_step, save_checkpoint
        batches = iter(data_loader)
        batch, losses = next(batches), []
        self.train()
        for step in range(start_step, max_iters):
            loss, batch = train_step(self, optimizer, batch, lambda: next(batches, batch), grad_clip=grad_clip)
            losses.append(loss)
            if log_interval and step % log_interval == 0:
                print(f"step {step}: loss {loss.item():.4f}")
            done = step + 1
            if checkpoint_dir and ((save_interval and done % save_interval == 0) or done == max_iters):
                save_checkpoint(checkpoint_dir, self, optimizer, done, None, None)
        return [loss.item() for loss in losses] # read once, at the end: each .item() waits for the GPU

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, vocab_size=None, use_cache=True):
        """
        Take a conditioning sequence of indices idx (LongTensor of shape (b,t)) and complete
        the sequence max_new_tokens times, feeding the predictions back into the model each time.
        vocab_size: sample only ids below it (a padded vocabulary's extra rows are not tokens).
        use_cache: run the model on each new token only (a KVCache), the same logits as recomputing the prefix.
        """
        cache = KVCache(self.config.block_size) if use_cache else None
        for _ in range(max_new_tokens):
            if idx.size(1) > self.config.block_size:
                cache = None # the window slides: every position moves, so no cached key holds any more
            # if the sequence context is growing too long we must crop it at block_size
            idx_cond = idx if idx.size(1) <= self.config.block_size else idx[:, -self.config.block_size:]
            logits, _ = self(idx_cond if cache is None else idx_cond[:, cache.length:], cache=cache)
            logits = logits[:, -1, :vocab_size] / temperature
            if top_k is not None:
                v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                logits[logits < v[:, [-1]]] = -float('Inf')
            probs = F.softmax(logits, dim=-1)
            idx_next = torch.multinomial(probs, num_samples=1)
            idx = torch.cat((idx, idx_next), dim=1)
        return idx


# -----------------------------------------------------------------------------
# state-dict key rules: every loader in the project goes through these two functions

WRAPPER_PREFIXES = ('_orig_mod.', 'module.') # torch.compile and DDP wrappers

def standard_key(key):
    """ the name a weight has in the standard model: an adapter's main_weight is the plain layer """
    return key.replace('.main_weight.', '.')

def is_lora_factor(key):
    return '.lora_A.' in key or '.lora_B.' in key

class CheckpointMismatchError(ValueError):
    """ the checkpoint's weights do not fit the model; the message lists what differs """


def strip_wrapper_prefixes(state_dict):
    out = {}
    for k, v in state_dict.items():
        while k.startswith(WRAPPER_PREFIXES):
            k = k.split('.', 1)[1]
        out[k] = v
    return out


def merge_lora_factors(weight, A, B, lora_alpha, out=None):
    """
    W + A/B update * alpha/r, computed in fp32 and cast once to W's dtype, never in place on W (into `out` if given).
    Linear: A [r, in], B [out, r], W += B @ A.  Embedding: A [V, r], B [D, r], W += A @ B^T.
    """
    if A.shape[0] == B.shape[1] and weight.shape == (B.shape[0], A.shape[1]):
        left, right, rank = B, A, A.shape[0]
    elif A.shape[1] == B.shape[1] and weight.shape == (A.shape[0], B.shape[0]):
        left, right, rank = A, B.t(), A.shape[1]
    else:
        raise CheckpointMismatchError(f"LoRA factors of shapes A {list(A.shape)}, B {list(B.shape)} "
                                      f"do not fit a weight of shape {list(weight.shape)}")
    # one fused pass into new memory (measured here: 2.6x faster than a copy then addmm_ in place, 1.8x than W + B@A*s)
    if out is not None and out.dtype == torch.float32:
        return torch.addmm(weight.float(), left.float(), right.float(), alpha=lora_alpha / rank, out=out)
    merged = torch.addmm(weight.float(), left.float(), right.float(), alpha=lora_alpha / rank).to(weight.dtype)
    return merged if out is None else out.copy_(merged)


def merge_checked(module, weight, A, B, lora_alpha, out=None):
    merged = merge_lora_factors(weight, A, B, lora_alpha, out)
    if not torch.isfinite(merged.sum()): # a NaN or inf anywhere spoils the sum: one cheap pass, no mask
        raise CheckpointMismatchError(f"merging the LoRA adapter of {module} gave NaN/inf weights: "
                                      "the adapter has diverged; nothing was saved or loaded")
    return merged


def standardize_state_dict(state_dict, lora_alpha=None, deferred=None):
    """
    Bring any of our state dicts to the standard nanoGPT form: wrapper prefixes stripped, old nanoGPT's
    causal-mask buffers (4-D `attn.bias`) dropped, LoRA factors merged into their main weights (needs the
    source's lora_alpha), `X.main_weight.*` renamed to `X.*`, and the tied head equal to the embedding.
    deferred: a list. Given one, the merges of CPU weights are left to the caller: each merged weight is new, empty
    memory, and (that tensor, a job that fills it) goes into the list (save_tensors runs them while it writes).
    """
    sd = strip_wrapper_prefixes(state_dict)
    sd = {k: v for k, v in sd.items() if not (k.endswith('.attn.bias') and v.dim() == 4)}
    out, merged_embedding = {}, False
    for k, v in sd.items():
        if is_lora_factor(k):
            continue # merged into their main weight below
        if k.endswith('.main_weight.weight'):
            module = k[:-len('.main_weight.weight')]
            A, B = sd.get(f'{module}.lora_A.weight'), sd.get(f'{module}.lora_B.weight')
            if A is not None and B is not None:
                if lora_alpha is None:
                    raise CheckpointMismatchError(
                        f"the state dict holds LoRA factors for {module} but no lora_alpha was given, so "
                        "they cannot be merged; pass the lora_alpha the checkpoint was trained with")
                if deferred is not None and v.device.type == 'cpu':
                    target = torch.empty(v.shape, dtype=v.dtype)
                    deferred.append((target, functools.partial(merge_checked, module, v, A, B, lora_alpha, target)))
                    v = target
                else:
                    v = merge_checked(module, v, A, B, lora_alpha)
                merged_embedding |= module == 'transformer.wte'
        out[standard_key(k)] = v
    # nanoGPT ties lm_head to wte, so the head of a merged model is the merged embedding
    wte, head = out.get('transformer.wte.weight'), out.get('lm_head.weight')
    if wte is not None and (head is None or merged_embedding):
        out['lm_head.weight'] = wte
    elif wte is not None and head.data_ptr() != wte.data_ptr() and not torch.equal(head, wte):
        raise CheckpointMismatchError("the state dict has an lm_head.weight that differs from transformer.wte.weight, "
                                      "but this GPT ties the two (as nanoGPT does); an untied head cannot be loaded")
    return out


def load_universal_state_dict(model, state_dict, lora_alpha=None, source='the checkpoint', adapters=None):
    """
    Load any of our state dicts (standard, merged, LoRA-shaped, compiled or DDP-wrapped) into `model`,
    whatever its adapter configuration, strictly. Keys are mapped explicitly: standard `X.weight`/`X.bias`
    go to `X.main_weight.*` where the model has an adapter. The only keys allowed to be missing are LoRA
    factors. They start fresh (update = 0, so the loaded function is preserved), unless `adapters` holds
    factors of the same shapes, saved by a run with this model's adapter config: then they are restored and
    their update is taken out of the merged base (base = merged - B@A*alpha/r), to continue that run exactly.
    Anything else missing, unexpected or misshapen raises CheckpointMismatchError; the model is unchanged.
    Returns a report dict: remapped (count), fresh_lora, restored_lora, merged_source_lora (module names).
    """
    sd = standardize_state_dict(state_dict, lora_alpha)
    target = model.state_dict()
    mapped, remapped = {}, 0
    for k, v in sd.items():
        module, leaf = k.rsplit('.', 1)
        if k not in target and f'{module}.main_weight.{leaf}' in target:
            k, remapped = f'{module}.main_weight.{leaf}', remapped + 1
        mapped[k] = v

    factors = [k for k in target if k not in mapped and is_lora_factor(k)]
    base = ', '.join(f'{f}={getattr(model.config, f)}' for f in BASE_FIELDS)
    check_state_dict_fits(target, mapped, source, f'GPT({base})', allowed_missing=factors)

    adapters = strip_wrapper_prefixes(adapters or {})
    restore = {k.rsplit('.lora_', 1)[0] for k in factors}
    restore = {m for m in restore if all(k in adapters and adapters[k].shape == target[k].shape
                                         for k in (f'{m}.lora_A.weight', f'{m}.lora_B.weight'))}
    for m in sorted(restore): # one order in every process: under FSDP each merge is collective
        A, B = adapters[f'{m}.lora_A.weight'], adapters[f'{m}.lora_B.weight']
        mapped[f'{m}.lora_A.weight'], mapped[f'{m}.lora_B.weight'] = A, B
        base = f'{m}.main_weight.weight'
        mapped[base] = merge_lora_factors(mapped[base], A, B, -model.config.lora_alpha)  # the same rule, run backwards
    if 'transformer.wte' in restore:
        mapped['lm_head.weight'] = mapped['transformer.wte.main_weight.weight']  # the head is tied to the base table
    fresh = sorted({k.rsplit('.lora_', 1)[0] for k in factors} - restore)
    # a model built on the meta device (no memory, no random init) takes the tensors themselves (assign): with an
    # mmap'd checkpoint, the weights are the file's pages, loaded at 1x memory. Otherwise they are copied in.
    on_meta = any(p.is_meta for p in model.parameters())
    for k in factors:  # placeholders for the new factors, initialised below: the load itself stays strict
        mapped.setdefault(k, torch.empty(target[k].shape, dtype=target[k].dtype) if on_meta else target[k])
    if on_meta:
        mapped = {k: v if v.dtype == target[k].dtype else v.to(target[k].dtype) for k, v in mapped.items()}
    model.load_state_dict(mapped, strict=True, assign=on_meta)
    if on_meta:
        model.token_table().weight = model.lm_head.weight  # assign gave the two tied keys two Parameters: tie again
        model.set_trainable()
    for m in fresh:
        model.get_submodule(m).reset_lora_parameters()
    merged_source = sorted({k.rsplit('.lora_', 1)[0] for k in strip_wrapper_prefixes(state_dict) if '.lora_A.' in k})
    return dict(remapped=remapped, fresh_lora=fresh, restored_lora=sorted(restore), merged_source_lora=merged_source)


def check_state_dict_fits(target, mapped, source, model_name, allowed_missing=()):
    """ raise CheckpointMismatchError, listing keys (first few and counts) and both shapes, unless `mapped`
    has exactly the keys and shapes of `target` (the model's state dict), but for allowed_missing """
    missing = [k for k in target if k not in mapped and k not in allowed_missing]
    unexpected = [k for k in mapped if k not in target]
    misshapen = [k for k in mapped if k in target and mapped[k].shape != target[k].shape]
    if not (missing or unexpected or misshapen):
        return
    def first(keys, show=4):
        return ', '.join(keys[:show]) + (f', ... ({len(keys) - show} more)' if len(keys) > show else '')
    parts = []
    if misshapen:
        shapes = [f'{k} (checkpoint {list(mapped[k].shape)} vs model {list(target[k].shape)})' for k in misshapen]
        parts.append(f'{len(misshapen)} tensors have the wrong shape: {first(shapes)}')
    if missing:
        parts.append(f'{len(missing)} keys are missing from {source}: {first(missing)}')
    if unexpected:
        parts.append(f'{len(unexpected)} keys in {source} have no place in the model: {first(unexpected)}')
    raise CheckpointMismatchError(f"Cannot load {source} into {model_name}: " + '; '.join(parts) +
                                  ". The checkpoint was made for another architecture; build the model from the "
                                  "checkpoint's own config. Nothing was loaded.")


# -----------------------------------------------------------------------------
# modded-nanogpt models, for fine-tuning its pretraining checkpoints (the layouts and forward math of its
# train_gpt_small.py and train_gpt_medium.py).
# GPTFlexAttention has exactly the keys of train_gpt_small.py's checkpoints; GPTBatched the keys of
# train_gpt_medium.py's (qkvo_w, fc_w, proj_w) and runs batched, right-padded input by the rules of the
# architecture its weights came from. Attention is plain causal attention, which is what the pretraining
# sliding windows compute for sequences up to 896 (small) / 1664 (medium) tokens, and it runs on a CPU.

NO_ATTENTION_LAYER = 7 # every layout skips attention in this layer
MEDIUM_SKIPS = {9: 6, 10: 4, 11: 2} # medium: before block i add scalars[j] * output of block j
KNOWN_HEADS = {(12, 768): 6, (16, 1024): 8, (24, 1152): 18, (36, 1280): 20} # (layers, model dim) -> heads
ATTENTION_SCALE = 0.12 # modded-nanogpt's constant softmax scale, not 1/sqrt(head_dim)
# each layout's logit soft cap on z = features @ head^T, as its pretraining script computes it (dim: model dim)
LOGIT_CAPS = {'small': lambda z, dim: 30 * torch.sigmoid(z / (7.5 * dim ** 0.5)),
              'medium': lambda z, dim: 15 * z * torch.rsqrt(z.square() + 225)}

def rms_norm(x):
    # no weight; computed in fp32 with fp32's machine eps whatever the input dtype, returned in that dtype
    return F.rms_norm(x.float(), (x.size(-1),), eps=torch.finfo(torch.float32).eps).type_as(x)


class Rotary(nn.Module):
    """ half-truncated rotary: head_dim/4 frequencies, then head_dim/4 zeros (those dimensions don't rotate) """

    def __init__(self, head_dim, max_seq_len):
        super().__init__()
        # the device named, not left to torch.device()'s redirection: transformers' from_pretrained swaps
        # torch.linspace for one that defaults to the CPU, and a redirection table built meanwhile keeps it
        device = torch.get_default_device()
        freq = (1 / 1024) ** torch.linspace(0, 1, steps=head_dim // 4, dtype=torch.float32, device=device)
        freq = torch.cat([freq, freq.new_zeros(head_dim // 4)])
        theta = torch.outer(torch.arange(max_seq_len, dtype=torch.float32, device=device), freq)
        self.register_buffer('cos', theta.cos(), persistent=False) # not in the checkpoints
        self.register_buffer('sin', theta.sin(), persistent=False)

    def forward(self, x, start=0): # x: (B, T, H, head_dim) at positions start, start + 1, ...
        cos, sin = (t[None, start:start + x.size(1), None, :] for t in (self.cos, self.sin))
        x1, x2 = x.float().chunk(2, dim=-1)
        return torch.cat((x1 * cos + x2 * sin, -x1 * sin + x2 * cos), dim=-1).type_as(x)


class SmallAttention(nn.Module):
    def __init__(self, dim, hdim):
        super().__init__()
        bound = (3 ** 0.5) * 0.5 * dim ** -0.5
        self.qkv_w = nn.Parameter(nn.init.uniform_(torch.empty(3, hdim, dim), -bound, bound))
        self.c_proj = nn.Linear(hdim, dim, bias=False)
        nn.init.zeros_(self.c_proj.weight) # zero-init output projection, as the training script does

    def weights(self): # (q, k, v stacked [3, hdim, dim]; output as an nn.Linear weight)
        return self.qkv_w, self.c_proj.weight


class SmallMLP(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.c_fc = nn.Linear(dim, 4 * dim, bias=False)
        self.c_proj = nn.Linear(4 * dim, dim, bias=False)
        nn.init.zeros_(self.c_proj.weight)

    def weights(self):
        return self.c_fc.weight, self.c_proj.weight


class MediumAttention(nn.Module):
    def __init__(self, dim, hdim):
        super().__init__()
        bound = (3 ** 0.5) * 0.5 * dim ** -0.5
        self.qkvo_w = nn.Parameter(nn.init.uniform_(torch.empty(4, hdim, dim), -bound, bound))
        with torch.no_grad():
            self.qkvo_w[3].zero_()

    def weights(self): # qkvo_w[3] is used as an nn.Linear weight [out, in] (the layouts need hdim == dim)
        w = self.qkvo_w # read once: with LoRA on it, each read computes base + update
        return w[:3], w[3]


class MediumMLP(nn.Module):
    def __init__(self, dim):
        super().__init__()
        bound = (3 ** 0.5) * 0.5 * dim ** -0.5
        self.fc_w = nn.Parameter(nn.init.uniform_(torch.empty(4 * dim, dim), -bound, bound))
        self.proj_w = nn.Parameter(torch.zeros(dim, 4 * dim))

    def weights(self):
        return self.fc_w, self.proj_w


class ModdedBlock(nn.Module):
    def __init__(self, attn, mlp):
        super().__init__()
        self.attn = attn # None in layer 7: no attn.* keys at all
        self.mlp = mlp


def check_modded_shape(num_layers, num_heads, model_dim, head_dim):
    if num_layers < 6:
        raise ValueError(f'modded-nanogpt models need at least 6 layers (value embeddings go to the first and last 3), got {num_layers}')
    if num_heads * head_dim != model_dim or head_dim % 4:
        raise ValueError(f'num_heads * head_dim must equal model_dim and head_dim be a multiple of 4, got '
                         f'{num_heads} x {head_dim} for model_dim {model_dim}')


def modded_embeddings(vocab_size, dim):
    return nn.Embedding(vocab_size, dim), nn.ModuleList([nn.Embedding(vocab_size, dim) for _ in range(3)])


def modded_scalars(num_layers):
    # [skip weights (L)] + [block lambdas (L pairs)] + [attention lambdas (L pairs)], as the training scripts start them
    return nn.Parameter(torch.cat([torch.ones(num_layers), torch.tensor([1.0, 0.0]).repeat(num_layers),
                                   torch.tensor([0.5, 0.5]).repeat(num_layers)]))


def modded_attention(x, w_qkv, w_out, rotary, num_heads, ve, lambdas, norm_v, cache=None, layer=None):
    B, T, _ = x.shape
    q, k, v = F.linear(x, w_qkv.flatten(end_dim=1).type_as(x)).view(B, T, 3 * num_heads, -1).chunk(3, dim=-2)
    start = cache.length if cache is not None else 0
    q, k = rotary(rms_norm(q), start), rotary(rms_norm(k), start)
    if norm_v:
        v = rms_norm(v)
    v = lambdas[0] * v + lambdas[1] * ve.view_as(v) if ve is not None else lambdas[0] * v
    y = causal_attention(q.transpose(1, 2), k.transpose(1, 2), v.type_as(q).transpose(1, 2), cache, layer,
                         scale=ATTENTION_SCALE)
    return F.linear(y.transpose(1, 2).reshape(B, T, -1), w_out.type_as(y))


def modded_features(model, idx, arch, cache=None):
    """
    The final normed hidden states (B, T, D) of either layout, by the rules of `arch` ('small' or 'medium'):
    small: pre-normed attention input, v not normed, U-net skips; medium: no pre-norm, v normed, fixed skips.
    cache: a KVCache of the positions before idx's (generation), filled with idx's on the way.
    """
    if idx.dim() == 1:
        idx = idx[None] # the training scripts feed one flat sequence
    L, s = len(model.blocks), model.scalars
    skip_w, lambdas, sa_lambdas = s[:L], s[L:3 * L].view(-1, 2), s[3 * L:5 * L].view(-1, 2)
    ve = [e(idx) for e in model.value_embeds]
    ve = ve + [None] * (L - 6) + ve # value embeddings in the first and last three layers
    x = x0 = rms_norm(model.embed(idx))
    outputs, n = [], L // 2
    for i, block in enumerate(model.blocks):
        if arch == 'small' and i >= n:
            x = x + skip_w[i - n] * outputs[2 * n - 1 - i] # U-net: 6 <- 5, 7 <- 4, ..., 11 <- 0
        if arch == 'medium' and i in MEDIUM_SKIPS:
            x = x + skip_w[MEDIUM_SKIPS[i]] * outputs[MEDIUM_SKIPS[i]]
        x = lambdas[i][0] * x + lambdas[i][1] * x0
        if block.attn is not None:
            w_qkv, w_out = block.attn.weights()
            x = x + modded_attention(rms_norm(x) if arch == 'small' else x, w_qkv, w_out, model.rotary,
                                     model.num_heads, ve[i], sa_lambdas[i], arch == 'medium', cache, block.attn)
        fc, proj = block.mlp.weights()
        x = x + F.linear(F.relu(F.linear(rms_norm(x), fc.type_as(x))).square(), proj.type_as(x))
        outputs.append(x)
    if cache is not None:
        cache.length += idx.size(1)
    return rms_norm(x)


class GPTFlexAttention(nn.Module):
    """ train_gpt_small.py's model: its exact keys, its forward (plain causal attention, so it runs on a CPU) """

    def __init__(self, vocab_size, num_layers, num_heads, model_dim, max_seq_len, head_dim=128):
        super().__init__()
        check_modded_shape(num_layers, num_heads, model_dim, head_dim)
        self.num_heads, self.head_dim, self.model_dim = num_heads, head_dim, model_dim
        hdim = num_heads * head_dim
        self.embed, self.value_embeds = modded_embeddings(vocab_size, model_dim)
        self.blocks = nn.ModuleList([ModdedBlock(SmallAttention(model_dim, hdim) if i != NO_ATTENTION_LAYER else None,
                                                 SmallMLP(model_dim)) for i in range(num_layers)])
        self.rotary = Rotary(head_dim, max_seq_len)
        self.lm_head = nn.Linear(model_dim, vocab_size, bias=False)
        self.scalars = modded_scalars(num_layers)

    def forward_features(self, idx, cache=None):
        return modded_features(self, idx, 'small', cache)

    def forward(self, idx, cache=None):
        return LOGIT_CAPS['small'](self.lm_head(self.forward_features(idx, cache)).float(), self.model_dim)


class GPTBatched(nn.Module):
    """
    The medium parameter layout (qkvo_w, fc_w, proj_w) over right-padded (B, T) batches. `arch` says whose
    forward rules to run: 'medium' for medium checkpoints, 'small' for weights converted from a small one.
    Attention is causal, so padding never changes the features at real positions. With lm_head_rows, the LM
    head `lm_head_w` (the small layout's lm_head.weight, or medium's own) and forward gives the pretraining
    logits, capped by the arch's rule; without, it is a backbone for a task head on forward_features.
    """

    def __init__(self, vocab_size, num_layers, num_heads, model_dim, max_seq_len, head_dim=128, arch='medium',
                 lm_head_rows=0):
        super().__init__()
        assert arch in ('small', 'medium'), arch
        check_modded_shape(num_layers, num_heads, model_dim, head_dim)
        self.num_heads, self.head_dim, self.model_dim, self.arch = num_heads, head_dim, model_dim, arch
        hdim = num_heads * head_dim
        self.embed, self.value_embeds = modded_embeddings(vocab_size, model_dim)
        self.blocks = nn.ModuleList([ModdedBlock(MediumAttention(model_dim, hdim) if i != NO_ATTENTION_LAYER else None,
                                                 MediumMLP(model_dim)) for i in range(num_layers)])
        self.rotary = Rotary(head_dim, max_seq_len)
        self.scalars = modded_scalars(num_layers)
        if lm_head_rows:
            self.lm_head_w = nn.Parameter(torch.zeros(lm_head_rows, model_dim)) # zero, as pretraining starts it

    def forward_features(self, idx, cache=None):
        return modded_features(self, idx, self.arch, cache)

    def forward(self, idx, cache=None):
        """ logits (B, T, head rows) in float32 """
        if not hasattr(self, 'lm_head_w'):
            raise ValueError('this GPTBatched has no LM head (built with lm_head_rows=0, for a task head): '
                             'use forward_features')
        features = self.forward_features(idx, cache)
        z = F.linear(features, self.lm_head_w.type_as(features)).float()
        return LOGIT_CAPS[self.arch](z, self.model_dim)

    @classmethod
    def from_pretrained_gpt(cls, flex_model, lm_head=False):
        """ a GPTFlexAttention's weights in the batched layout, still run by the small rules (with its head) """
        f = flex_model
        rows = f.lm_head.weight.size(0) if lm_head else 0
        model = cls(f.embed.num_embeddings, len(f.blocks), f.num_heads, f.model_dim, f.rotary.cos.size(0), f.head_dim,
                    arch='small', lm_head_rows=rows)
        sd = {k: v for k, v in f.state_dict().items() if lm_head or k != 'lm_head.weight'}
        model.load_state_dict(small_to_medium_state_dict(sd), strict=True)
        return model


# -----------------------------------------------------------------------------
# LoRA on GPTBatched's stacked weights, for fine-tuning modded checkpoints. A parametrization keeps the layout's
# own keys: reading qkvo_w / fc_w / proj_w gives base + update, the frozen base lives on as
# parametrizations.<name>.original and the factors as parametrizations.<name>.0.lora_A / lora_B. Saved, the
# weights are merged under the layout's keys (a plain fine-tuned model), the factors beside them.

class StackedLoRA(nn.Module):
    """ W [..., out, in] -> W + B @ A * alpha/r, one pair of factors per matrix of a stack (qkvo_w stacks 4) """

    def __init__(self, shape, rank, alpha):
        super().__init__()
        *stack, out_features, in_features = shape
        self.rank, self.alpha, self.scale = rank, alpha, alpha / rank
        self.lora_A = nn.Parameter(torch.empty(*stack, rank, in_features))
        self.lora_B = nn.Parameter(torch.zeros(*stack, out_features, rank)) # B zero: the update starts at 0
        for a in self.lora_A.view(-1, rank, in_features): # LoRALinear's init, matrix by matrix
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))

    def delta(self):
        return self.lora_B @ self.lora_A * self.scale

    def forward(self, weight):
        return weight + self.delta().to(weight.dtype)


def add_modded_lora(model, rank, alpha):
    """ freeze all of a GPTBatched and put LoRA on every attention (qkvo_w) and MLP (fc_w, proj_w) weight """
    for p in model.parameters():
        p.requires_grad_(False)
    for block in model.blocks:
        for module, name in ((block.attn, 'qkvo_w'), (block.mlp, 'fc_w'), (block.mlp, 'proj_w')):
            if module is not None: # layer 7 has no attention
                parametrize.register_parametrization(module, name, StackedLoRA(getattr(module, name).shape, rank, alpha))
    return model


def lora_parametrizations(model):
    """ (key prefix of the merged weight, its parametrization list) for every LoRA weight in model """
    return [(f'{mname}.{pname}' if mname else pname, plist) for mname, module in model.named_modules()
            if parametrize.is_parametrized(module) for pname, plist in module.parametrizations.items()]


def modded_lora_state(model):
    """ (merged weights under the layout's own keys, the LoRA factors) of a model, with or without LoRA """
    state = model.state_dict()
    merged = {k: v for k, v in state.items() if '.parametrizations.' not in k}
    factors = {k: v for k, v in state.items() if '.parametrizations.' in k and not k.endswith('.original')}
    with torch.no_grad():
        for key, plist in lora_parametrizations(model):
            original = plist.original
            merged[key] = (original.float() + plist[0].delta().float()).to(original.dtype)
    return merged, factors


def set_modded_lora_factors(model, factors):
    """
    Saved factors into a model whose LoRA weights hold merged values (add_modded_lora on a merged load): the
    factors are copied and each base becomes merged - B @ A * alpha/r, in fp32, so the forward is unchanged.
    """
    names = {f'{key.rsplit(".", 1)[0]}.parametrizations.{key.rsplit(".", 1)[1]}': plist
             for key, plist in lora_parametrizations(model)}
    expected = {f'{prefix}.0.{f}' for prefix in names for f in ('lora_A', 'lora_B')}
    if set(factors) != expected:
        raise CheckpointMismatchError(f'the saved LoRA factors do not fit this model: {len(set(factors) - expected)} '
                                      f'unexpected, {len(expected - set(factors))} missing (e.g. '
                                      f'{sorted(set(factors) ^ expected)[:2]})')
    with torch.no_grad():
        for prefix, plist in names.items():
            lora = plist[0]
            for f in ('lora_A', 'lora_B'):
                if factors[f'{prefix}.0.{f}'].shape != getattr(lora, f).shape:
                    raise CheckpointMismatchError(f'{prefix}.0.{f} has shape {tuple(factors[f"{prefix}.0.{f}"].shape)}, '
                                                  f'this model {tuple(getattr(lora, f).shape)}: another LoRA rank')
                getattr(lora, f).copy_(factors[f'{prefix}.0.{f}'])
            plist.original.copy_((plist.original.float() - lora.delta().float()).to(plist.original.dtype))


def small_to_medium_state_dict(sd):
    """
    The small layout's keys in the medium layout: qkv_w -> qkvo_w[0:3], attn.c_proj.weight -> qkvo_w[3]
    *untransposed* (both are used as [out, in]), mlp.c_fc.weight -> fc_w, mlp.c_proj.weight -> proj_w,
    lm_head.weight -> lm_head_w.
    """
    out = {}
    for k, v in sd.items():
        if k.endswith('.attn.qkv_w'):
            out[k[:-len('qkv_w')] + 'qkvo_w'] = torch.cat([v, sd[k[:-len('qkv_w')] + 'c_proj.weight'][None].to(v.dtype)])
        elif k.endswith('.attn.c_proj.weight'):
            continue # went into qkvo_w[3] above
        elif k.endswith('.mlp.c_fc.weight'):
            out[k[:-len('c_fc.weight')] + 'fc_w'] = v
        elif k.endswith('.mlp.c_proj.weight'):
            out[k[:-len('c_proj.weight')] + 'proj_w'] = v
        elif k == 'lm_head.weight':
            out['lm_head_w'] = v
        else:
            out[k] = v
    return out
