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

import math
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F


class LayerNorm(nn.Module):
    """ LayerNorm but with an optional bias. PyTorch doesn't support simply bias=False """

    def __init__(self, ndim, bias):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, input):
        return F.layer_norm(input, self.weight.shape, self.weight, self.bias, 1e-5)


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

    def forward(self, x):
        B, T, C = x.size() # batch size, sequence length, embedding dimensionality (n_embd)
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) # (B, nh, T, hs)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=None,
                                           dropout_p=self.dropout if self.training else 0, is_causal=True)
        y = y.transpose(1, 2).contiguous().view(B, T, C) # re-assemble all head outputs side by side
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.c_fc = make_linear(config.n_embd, config.n_hidden, config.bias, config.mlp_lora_rank, config)
        self.gelu = nn.GELU()
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

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        x = x + self.mlp(self.ln_2(x))
        return x


# the fields that define the weights; the rest of GPTConfig is how adapters are laid over them
BASE_FIELDS = ('block_size', 'vocab_size', 'n_layer', 'n_head', 'n_embd', 'bias', 'n_hidden')

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
        """ the model's structure without memory or init, to read names and shapes """
        with torch.device('meta'):
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

    def forward(self, idx, targets=None):
        device = idx.device
        b, t = idx.size()
        assert t <= self.config.block_size, f"Cannot forward sequence of length {t}, block size is only {self.config.block_size}"
        pos = torch.arange(0, t, dtype=torch.long, device=device) # shape (t)

        # forward the GPT model itself
        tok_emb = self.transformer.wte(idx) # token embeddings of shape (b, t, n_embd)
        pos_emb = self.transformer.wpe(pos) # position embeddings of shape (t, n_embd)
        x = self.transformer.drop(tok_emb + pos_emb)
        for block in self.transformer.h:
            x = block(x)
        x = self.transformer.ln_f(x)

        if targets is None:
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
        # model surgery to decrease the block size if necessary
        assert block_size <= self.config.block_size
        self.config.block_size = block_size
        self.transformer.wpe.weight = nn.Parameter(self.transformer.wpe.weight[:block_size])

    def get_merged_state_dict(self):
        """
        The universal checkpoint: exactly the keys and shapes of the standard (adapter-free) model of the
        same base config, with every adapter merged in (W + B @ A * alpha/r, in fp32, cast once). The live
        model is not touched; unmerged tensors are shared with it, not copied.
        """
        return standardize_state_dict(self.state_dict(), self.config.lora_alpha)

    def optimizer_groups(self):
        """ nanoGPT's two AdamW groups as (name, param) lists: 2D tensors (matmuls, embeddings) decay,
        biases and norms don't; only parameters that train. Its order is the one nanoGPT's ckpt.pt relies on. """
        params = [(n, p) for n, p in self.named_parameters() if p.requires_grad]
        return [(n, p) for n, p in params if p.dim() >= 2], [(n, p) for n, p in params if p.dim() < 2]

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        decay, nodecay = self.optimizer_groups()
        decay_params, nodecay_params = [p for _, p in decay], [p for _, p in nodecay]
        optim_groups = [
            {'params': decay_params, 'weight_decay': weight_decay},
            {'params': nodecay_params, 'weight_decay': 0.0}
        ]
        num_decay_params = sum(p.numel() for p in decay_params)
        num_nodecay_params = sum(p.numel() for p in nodecay_params)
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

    # seed 003's notebook-style API: thin calls into core/checkpoint.py and core/training.py

    def save(self, checkpoint_dir):
        """ only model.pt: the universal merged weights """
        from core.checkpoint import MODEL_FILE, atomic_write
        os.makedirs(checkpoint_dir, exist_ok=True)
        merged = self.get_merged_state_dict()
        atomic_write(os.path.join(checkpoint_dir, MODEL_FILE), lambda f: torch.save(merged, f))

    def save_checkpoint_bundle(self, checkpoint_dir, step, optimizer_state=None, **state):
        """ the whole bundle; optimizer_state: an optimizer, its state_dict() or a named state """
        from core.checkpoint import save_bundle
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
                print(f"step {step}: loss {loss:.4f}")
            done = step + 1
            if checkpoint_dir and ((save_interval and done % save_interval == 0) or done == max_iters):
                save_checkpoint(checkpoint_dir, self, optimizer, done, None, None)
        return losses

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, vocab_size=None):
        """
        Take a conditioning sequence of indices idx (LongTensor of shape (b,t)) and complete
        the sequence max_new_tokens times, feeding the predictions back into the model each time.
        vocab_size: sample only ids below it (a padded vocabulary's extra rows are not tokens).
        """
        for _ in range(max_new_tokens):
            # if the sequence context is growing too long we must crop it at block_size
            idx_cond = idx if idx.size(1) <= self.config.block_size else idx[:, -self.config.block_size:]
            logits, _ = self(idx_cond)
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


def merge_lora_factors(weight, A, B, lora_alpha):
    """
    W + A/B update * alpha/r, computed in fp32 and cast once to W's dtype, never in place on W.
    Linear: A [r, in], B [out, r], W += B @ A.  Embedding: A [V, r], B [D, r], W += A @ B^T.
    """
    if A.shape[0] == B.shape[1] and weight.shape == (B.shape[0], A.shape[1]):
        left, right, rank = B, A, A.shape[0]
    elif A.shape[1] == B.shape[1] and weight.shape == (A.shape[0], B.shape[0]):
        left, right, rank = A, B.t(), A.shape[1]
    else:
        raise CheckpointMismatchError(f"LoRA factors of shapes A {list(A.shape)}, B {list(B.shape)} "
                                      f"do not fit a weight of shape {list(weight.shape)}")
    merged = weight.to(torch.float32, copy=True).addmm_(left.float(), right.float(), alpha=lora_alpha / rank)
    return merged.to(weight.dtype)


def standardize_state_dict(state_dict, lora_alpha=None):
    """
    Bring any of our state dicts to the standard nanoGPT form: wrapper prefixes stripped, old nanoGPT's
    causal-mask buffers (4-D `attn.bias`) dropped, LoRA factors merged into their main weights (needs the
    source's lora_alpha), `X.main_weight.*` renamed to `X.*`, and the tied head equal to the embedding.
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
                v = merge_lora_factors(v, A, B, lora_alpha)
                if not torch.isfinite(v).all():
                    raise CheckpointMismatchError(f"merging the LoRA adapter of {module} gave NaN/inf weights: "
                                                  "the adapter has diverged; nothing was saved or loaded")
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

    missing = [k for k in target if k not in mapped]
    factors = [k for k in missing if is_lora_factor(k)]
    missing = [k for k in missing if not is_lora_factor(k)]
    unexpected = [k for k in mapped if k not in target]
    misshapen = [k for k in mapped if k in target and mapped[k].shape != target[k].shape]
    if missing or unexpected or misshapen:
        raise CheckpointMismatchError(describe_mismatch(source, model.config, missing, unexpected, misshapen, mapped, target))

    adapters = strip_wrapper_prefixes(adapters or {})
    restore = {k.rsplit('.lora_', 1)[0] for k in factors}
    restore = {m for m in restore if all(k in adapters and adapters[k].shape == target[k].shape
                                         for k in (f'{m}.lora_A.weight', f'{m}.lora_B.weight'))}
    for m in restore:
        A, B = adapters[f'{m}.lora_A.weight'], adapters[f'{m}.lora_B.weight']
        mapped[f'{m}.lora_A.weight'], mapped[f'{m}.lora_B.weight'] = A, B
        base = f'{m}.main_weight.weight'
        mapped[base] = merge_lora_factors(mapped[base], A, B, -model.config.lora_alpha)  # the same rule, run backwards
    if 'transformer.wte' in restore:
        mapped['lm_head.weight'] = mapped['transformer.wte.main_weight.weight']  # the head is tied to the base table
    fresh = sorted({k.rsplit('.lora_', 1)[0] for k in factors} - restore)
    for k in factors:
        mapped.setdefault(k, target[k])  # placeholders, re-initialised below: the load itself stays strict
    model.load_state_dict(mapped, strict=True)
    for m in fresh:
        model.get_submodule(m).reset_lora_parameters()
    merged_source = sorted({k.rsplit('.lora_', 1)[0] for k in strip_wrapper_prefixes(state_dict) if '.lora_A.' in k})
    return dict(remapped=remapped, fresh_lora=fresh, restored_lora=sorted(restore), merged_source_lora=merged_source)


def describe_mismatch(source, config, missing, unexpected, misshapen, mapped, target, show=4):
    def first(keys):
        return ', '.join(keys[:show]) + (f', ... ({len(keys) - show} more)' if len(keys) > show else '')
    base = ', '.join(f'{f}={getattr(config, f)}' for f in BASE_FIELDS)
    parts = []
    if misshapen:
        shapes = [f'{k} (checkpoint {list(mapped[k].shape)} vs model {list(target[k].shape)})' for k in misshapen]
        parts.append(f'{len(misshapen)} tensors have the wrong shape: {first(shapes)}')
    if missing:
        parts.append(f'{len(missing)} keys are missing from {source}: {first(missing)}')
    if unexpected:
        parts.append(f'{len(unexpected)} keys in {source} have no place in the model: {first(unexpected)}')
    return (f"Cannot load {source} into GPT({base}): " + '; '.join(parts) +
            ". The checkpoint was made for another architecture; build the model from the checkpoint's own config. "
            "Nothing was loaded.")
