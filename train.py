"""
Training, nanoGPT's train.py: one process on a CPU or GPU, or several with torchrun (DDP), e.g.
$ python train.py                                        # a baby GPT on the embedded corpus, on a laptop CPU
$ python train.py config/train_standard.py               # then config/train_with_lora.py continues it with LoRA
$ python train.py --model_name dante --max_iters 1100    # checkpoints/dante: resumed if it exists (legacy too)
$ torchrun --standalone --nproc_per_node=4 train.py config/train_standard.py
$ torchrun --standalone --nproc_per_node=4 train.py config/train_standard.py --fsdp=True   # sharded (FSDP2)

Every save is a bundle of universal merged weights (core/bundle.py); under FSDP its sharded twin (core/sharded.py).
Every resume takes the base architecture from the checkpoint and the adapter settings from this run's config, maps
the weights onto them, and carries the optimizer state over by parameter name. The settings are checked once, before
any work (core/train_checks.py); an error is one paragraph and exit code 1, its traceback only with --debug=True.
"""

import os
import signal
import sys
import time
from contextlib import nullcontext

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.distributed import init_process_group

from model import GPTConfig, GPT, ADAPTER_FIELDS, BASE_FIELDS, CheckpointMismatchError
from configurator import apply_config
from core.bundle import apply_optimizer_state, rng_state, set_rng_state, wait_for_saves
from core.checkpoint import CheckpointError, describe_load, find_checkpoint, read_checkpoint
from core.cli import DEFAULT_DTYPE, report_errors, start_wandb
from core.distributed import end_process_group, lock_for_the_run
from core.fsdp import is_sharded, shard_model
from core.hf import GPT2_NAMES, pretrained_gpt2_dir
from core.peft_adapter import read_peft
from core.train_checks import check_train_config, check_vocabulary, checkpoint_dir, nothing_saved_note, resume_notes
from core.training import get_lr, set_lr, train_step, estimate_loss, save_checkpoint, resume_check_line
from data.prepare import DatasetError, load_meta, prepare

# -----------------------------------------------------------------------------
# default config values: a baby GPT on the embedded corpus, a few minutes on a laptop CPU
# I/O
out_dir = 'out'
model_name = '' # if set, checkpoints live in checkpoints/<model_name> (and are resumed from there)
eval_interval = 250
log_interval = 10
eval_iters = 20
eval_only = False # if True, script exits right after the first eval
always_save_checkpoint = True # if True, always save a checkpoint after each eval
save_optimizer = True # False: a deploy-only bundle (no optimizer.pt)
async_save = False # True: training waits only while a save copies the state to CPU memory; the write runs beside it
                   # (on by default with fsdp = True, unless set: the loop waited 0.03-0.19x of the save, bench/bench_fsdp.py)
init_from = 'scratch' # 'scratch', 'resume' (from out_dir), or a path (a bundle, ckpt.pt, Hugging Face GPT-2 dir)
resume_from = '' # a bundle directory or legacy checkpoint file to resume from (implies resuming)
adapter_from = '' # a peft LoRA adapter directory to continue, with its settings; its base model: init_from, or DIR/base
probe_check = True # False: go on when the loaded model fails the probe its checkpoint stores (said, for experts)
# wandb logging
wandb_log = False # disabled by default
wandb_project = 'nanogpt-checkpoints'
wandb_run_name = 'run'
# data
dataset = 'pydocs_char'
gradient_accumulation_steps = 1 # used to simulate larger batch sizes
batch_size = 16 # if gradient_accumulation_steps > 1, this is the micro-batch size
block_size = 128
# model (base architecture; on resume the checkpoint's values win)
n_layer = 4
n_head = 4
n_embd = 128
n_hidden = 0 # MLP width, 0 = 4 * n_embd
dropout = 0.0 # for pretraining 0 is good, for finetuning try 0.1+
bias = False # do we use bias inside LayerNorm and Linear layers?
# adapters (always this run's own choice)
embedding_mode = 'standard' # 'standard' or 'lora'
attn_lora_rank = 0
embedding_rank = 0
mlp_lora_rank = 0
lora_alpha = 1.0
lora_dropout = 0.0
lora_train_norms_biases = False
# adamw optimizer
learning_rate = 1e-3 # max learning rate
max_iters = 2000 # total number of training iterations
weight_decay = 1e-1
beta1 = 0.9
beta2 = 0.99
grad_clip = 1.0 # clip gradients at this value, or disable if == 0.0
# learning rate decay settings
decay_lr = True # whether to decay the learning rate
warmup_iters = 100 # how many steps to warm up for
lr_decay_iters = 2000 # should be ~= max_iters per Chinchilla
min_lr = 1e-4 # minimum learning rate, should be ~= learning_rate/10 per Chinchilla
# DDP settings
backend = 'nccl' if torch.cuda.is_available() else 'gloo'
fsdp = False # under torchrun: shard parameters, gradients and optimizer state across the processes (FSDP2), not copy them (DDP)
# system
device = 'cuda' if torch.cuda.is_available() else 'cpu' # or 'cpu', 'cuda:0', 'mps'
dtype = DEFAULT_DTYPE # 'bfloat16' where the GPU has it, else 'float16' on a GPU, else 'float32'
compile = False # use PyTorch 2.0 to compile the model to be faster
seed = 1337
debug = False # show the traceback of errors that are otherwise reported in one paragraph
# -----------------------------------------------------------------------------
config_keys = [k for k,v in globals().items() if not k.startswith('_') and isinstance(v, (int, float, bool, str))]
config = {k: globals()[k] for k in config_keys}
defaults = dict(config)
given = set() # the settings this run gives (command line, config files), told apart from the defaults it leaves
report_errors() # a clear error ends the run in one paragraph, exit code 1 (core/cli.py)
apply_config(config, sys.argv[1:], given) # overrides from the command line or a config file
globals().update(config)
report_errors(debug) # the traceback too, with debug = True
# -----------------------------------------------------------------------------

# what the run says, said once: under torchrun by the first process only (RANK 0), not once per process
log = print if os.environ.get('RANK', '0') == '0' else (lambda *args: None)
for note in check_train_config(config): # settings no run can use stop it here, before any work
    log(f"note: {note}")
if fsdp and 'async_save' not in given:
    async_save = config['async_save'] = True
out_dir = config['out_dir'] = checkpoint_dir(config)

# various inits, derived attributes, I/O setup
ddp = int(os.environ.get('RANK', -1)) != -1 # is this a ddp run?
if ddp:
    init_process_group(backend=backend)
    ddp_rank = int(os.environ['RANK'])
    ddp_local_rank = int(os.environ['LOCAL_RANK'])
    ddp_world_size = int(os.environ['WORLD_SIZE'])
    if device.startswith('cuda'):
        device = f'cuda:{ddp_local_rank}'
        torch.cuda.set_device(device)
    master_process = ddp_rank == 0 # this process will do logging, checkpointing etc.
    seed_offset = ddp_rank # each process gets a different seed
    # world_size number of processes will be training simultaneously, so we can scale down the desired
    # gradient accumulation iterations per process proportionally (the config's tokens per step stay)...
    if gradient_accumulation_steps % ddp_world_size == 0:
        gradient_accumulation_steps //= ddp_world_size
    elif master_process: # ...and where they do not divide, each process runs the config's own accumulation
        print(f"note: gradient_accumulation_steps = {gradient_accumulation_steps} does not divide among "
              f"{ddp_world_size} processes, so each process runs {gradient_accumulation_steps} micro-step(s): a step "
              f"trains on {ddp_world_size}x the config's tokens (for the config's tokens per step, pass a multiple "
              f"of {ddp_world_size}, e.g. --gradient_accumulation_steps={ddp_world_size})")
else:
    # if not ddp, we are running on a single gpu, and one process
    master_process = True
    seed_offset = 0
    ddp_world_size = 1
lock_for_the_run(out_dir, master_process and not eval_only, device) # one writer per out_dir (core/distributed.py)
torch.manual_seed(seed + seed_offset)
torch.backends.cuda.matmul.allow_tf32 = True # allow tf32 on matmul
torch.backends.cudnn.allow_tf32 = True # allow tf32 on cudnn
device_type = 'cuda' if 'cuda' in device else 'cpu' # for later use in torch.autocast
# note: float16 data type will automatically use a GradScaler
ptdtype = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}[dtype]
# (under FSDP, its MixedPrecisionPolicy casts the parameters instead: core/fsdp.py)
ctx = nullcontext() if device_type == 'cpu' or fsdp else torch.amp.autocast(device_type=device_type, dtype=ptdtype)

# data: prepared on first use (the default corpus needs no download)
data_dir = os.path.join('data', dataset) # nanoGPT's place, relative to where you run; else the repo's own
if not os.path.isdir(data_dir):
    data_dir = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data', dataset)
if not os.path.exists(os.path.join(data_dir, 'train.bin')) and master_process:
    prepare(dataset, out_dir=data_dir)
if ddp:
    torch.distributed.barrier() # the other ranks read what rank 0 prepared
meta = load_meta(data_dir)

def get_batch(split, generator=None):
    # We recreate np.memmap every batch to avoid a memory leak, as per
    # https://stackoverflow.com/questions/45132940/numpy-memmap-memory-usage-want-to-iterate-once/61472122#61472122
    data = np.memmap(os.path.join(data_dir, f'{split}.bin'), dtype=np.uint16, mode='r')
    ix = torch.randint(len(data) - block_size, (batch_size,), generator=generator)
    x = torch.stack([torch.from_numpy((data[i:i+block_size]).astype(np.int64)) for i in ix])
    y = torch.stack([torch.from_numpy((data[i+1:i+1+block_size]).astype(np.int64)) for i in ix])
    if device_type == 'cuda':
        # pin arrays x,y, which allows us to move them to GPU asynchronously (non_blocking=True)
        x, y = x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    else:
        x, y = x.to(device), y.to(device)
    return x, y

# init these up here, can override if init_from='resume' (i.e. from a checkpoint)
iter_num = 0
best_val_loss = 1e9

# model init: base architecture from the config, or from the checkpoint on resume; adapters from the config
if fsdp: # every process builds the same model (new weights, new adapters) and keeps its shard of it; DDP instead
    torch.manual_seed(seed) # broadcasts the first process's model
model_args = {k: config[k] for k in BASE_FIELDS + ADAPTER_FIELDS + ('dropout',) if k in config}
resume_path = resume_from or (out_dir if init_from == 'resume' or (model_name and find_checkpoint(out_dir)) else '')
if adapter_from:
    resume_path = '' # the base is init_from's, else the adapter's own (read_peft)
if init_from not in ('scratch', 'resume'):
    resume_path = init_from # a path: any bundle, legacy file or Hugging Face GPT-2 directory
    if init_from in GPT2_NAMES and not os.path.exists(init_from): # nanoGPT's: OpenAI's weights, via the HF cache
        resume_path = pretrained_gpt2_dir(init_from)
ckpt = None
if not resume_path and not adapter_from:
    log("Initializing a new model from scratch")
    # nanoGPT pads GPT-2's 50257 up to 50304 (a multiple of 64) for speed; a char vocabulary is used as is
    model_args['vocab_size'] = 50304 if meta['tokenizer']['token_kind'] == 'gpt2' else meta['vocab_size']
    model = GPT(GPTConfig(**model_args))
    model.tokenizer_spec = meta['tokenizer']
else:
    # --- smart resume: the checkpoint decides the base, this config the adapters; the key mapping lives in
    # model.load_universal_state_dict, the file formats in core/ (core/checkpoint.py lists them) ---
    named = f"{init_from} ({resume_path})" if init_from in GPT2_NAMES and resume_path != init_from else resume_path
    if adapter_from:
        log(f"Initializing from the peft adapter {adapter_from}" + (f" on the base model {named}" if named else ''))
    else:
        log(f"{'Initializing from' if init_from not in ('scratch', 'resume') else 'Resuming training from'} {named}")
    ckpt = read_peft(adapter_from, base=resume_path or None) if adapter_from else read_checkpoint(resume_path)
    ckpt.check_config() # a GPT whose config.json describes its weights, checked before anything is built
    check_vocabulary(ckpt, meta, data_dir)
    if adapter_from: # the adapter brings its settings (rank, alpha, targets); one this run sets otherwise wins
        for k, theirs in ckpt.training_state['adapter'].items():
            if k in given and config[k] != theirs:
                log(f"note: {k} = {config[k]} from this config is used (the peft adapter has {theirs})")
            else:
                model_args[k] = config[k] = theirs
    notes = resume_notes(ckpt, config, given, defaults, meta, data_dir)
    model_args.update({k: getattr(ckpt.config, k) for k in BASE_FIELDS}) # the checkpoint's base architecture
    model = GPT.on_meta(GPTConfig(**model_args)) # built without memory or init: the checkpoint fills it
    # under FSDP the model is sharded before the load where it can be: each process then reads its own shards
    shard_by_shard = fsdp and ckpt.loads_shard_by_shard(GPTConfig(**{**model_args, 'block_size': block_size}))
    if shard_by_shard:
        shard_model(model, device_type, ptdtype)
        model.to_empty(device=device)
    report = ckpt.load_into(model, probe_check, block_size) # nanoGPT's crop to a smaller block_size, then the probe
    log(describe_load(ckpt, report) + ('; each process read its own shards' if shard_by_shard else ''))
    for note in notes:
        log(f"note: {note}")
    block_size = config['block_size'] = min(block_size, ckpt.config.block_size)
    model.tokenizer_spec = ckpt.tokenizer or meta['tokenizer']
    iter_num = ckpt.step
    best_val_loss = ckpt.best_val_loss if ckpt.best_val_loss is not None else 1e9
# a resume that trains no step: evaluated, and saved only where it cannot overwrite what it read (deploy_standard.py
# writes the merged model to a new out_dir this way); its own checkpoint is never rewritten untrained
in_place = ckpt is not None and os.path.realpath(out_dir) == os.path.realpath(ckpt.path)
if ckpt is not None and iter_num >= max_iters and not eval_only:
    log(f"note: max_iters = {max_iters} is not above the checkpoint's step {iter_num}: no step is trained; "
        + (f"{out_dir} is left as it is (raise max_iters to train on)" if in_place else
           f"the model is evaluated and saved to {out_dir} as this run's configuration"))
tokens_per_iter = gradient_accumulation_steps * ddp_world_size * batch_size * block_size
log(f"tokens per iteration will be: {tokens_per_iter:,}")
for split in ('train', 'val'): # every batch draws block_size + 1 tokens from the split
    tokens = os.path.getsize(os.path.join(data_dir, f'{split}.bin')) // 2
    if tokens <= block_size:
        raise DatasetError(f'{data_dir}/{split}.bin has {tokens} tokens, but a batch needs block_size + 1 = '
                           f'{block_size + 1}: use a smaller --block_size or more text')
log("number of parameters: %.2fM (%.2fM trainable)" % (model.get_num_params(non_embedding=False)/1e6,
      sum(p.numel() for p in model.parameters() if p.requires_grad)/1e6))
model.to(device)
if fsdp:
    if not is_sharded(model):
        shard_model(model, device_type, ptdtype)
    torch.manual_seed(seed + seed_offset) # each process's own stream of batches from here

# initialize a GradScaler. If enabled=False scaler is a no-op
scaler = torch.amp.GradScaler(device_type, enabled=(dtype == 'float16'))

# optimizer; on resume its state is carried over by parameter name, fresh where names or shapes differ
optimizer = model.configure_optimizers(weight_decay, learning_rate, (beta1, beta2), device_type, master_process)
if ckpt is not None:
    kept, fresh = apply_optimizer_state(model, optimizer, ckpt.optimizer_state(model), report['fresh_lora'])
    log(f"optimizer: state carried over for {kept} parameter tensors, fresh for {fresh}")
    if 'scaler' in ckpt.training_state and scaler.is_enabled():
        scaler.load_state_dict(ckpt.training_state['scaler'])
    if ddp: # the checkpoint holds rank 0's random state: each rank needs a stream of its own
        torch.manual_seed(seed + seed_offset + iter_num)
    elif 'rng' in ckpt.training_state:
        set_rng_state(ckpt.training_state['rng']) # draw the same batches the interrupted run would have

# compile the model
if compile:
    log("compiling the model... (takes a ~minute)")
    model = torch.compile(model) # requires PyTorch 2.0

# wrap model into DDP container
if ddp and not fsdp:
    model = DDP(model, device_ids=[ddp_local_rank] if device_type == 'cuda' else None)

# logging
if wandb_log and master_process:
    wandb_run = start_wandb(wandb_project, wandb_run_name, config)

def evaluation_due(it):
    return it % eval_interval == 0 or it >= max_iters

def next_train_batch():
    # a checkpoint stores the random state its pending batch was drawn from, so that a resume draws that batch again.
    # The state is read only in a step that an evaluation (and so perhaps a save) follows, not in every step
    global rng_before_batch
    if evaluation_due(iter_num + 1):
        rng_before_batch = rng_state()
    return get_batch('train')

# training loop
rng_before_batch = rng_state() # (a resume's first evaluation may save before any step)
X, Y = get_batch('train') # fetch the very first batch
t0 = time.time()
local_iter_num = 0 # number of iterations in the lifetime of this process
raw_model = model.module if ddp and not fsdp else model # unwrap DDP container if needed
raw_model = getattr(raw_model, '_orig_mod', raw_model) # and torch.compile's wrapper
running_mfu = -1.0
saved = False

saving, ctrl_c = False, False # a Ctrl-C during a save waits for its commit (a second one does not wait)

def interrupted(signum, frame):
    # Ctrl-C: where the run stands, not a traceback from inside the optimizer. The step is read from the disk,
    # after the save in progress, if any, has committed
    global ctrl_c
    if saving and not ctrl_c:
        ctrl_c = True
        return
    try:
        wait_for_saves() # a save writing in the background commits first
    except (CheckpointError, CheckpointMismatchError) as e:
        log(f"note: {e}") # a background save that failed; the step on disk says what is there
    try:
        saved_step = read_checkpoint(out_dir).step if find_checkpoint(out_dir) else None
    except CheckpointError:
        saved_step = None
    where = (f"{out_dir} holds the checkpoint of step {saved_step}; continue with the same command plus "
             f"--resume_from={out_dir}" if saved_step is not None else "no checkpoint was saved")
    log(f"\ninterrupted at iter {iter_num}: {where}")
    sys.exit(130)
signal.signal(signal.SIGINT, interrupted)
while True:

    # determine and set the learning rate for this iteration
    lr = get_lr(iter_num, learning_rate, warmup_iters, lr_decay_iters, min_lr, decay_lr)
    set_lr(optimizer, lr)

    # evaluate the loss on train/val sets and write checkpoints (also right after a resume)
    # (under FSDP every process takes part: each holds a shard of the model)
    if (evaluation_due(iter_num) or (ckpt is not None and local_iter_num == 0)) and (master_process or fsdp):
        losses = estimate_loss(model, get_batch, eval_iters, ctx)
        if fsdp: # the same batches everywhere; the first process's numbers decide, so every process saves or none
            losses = [losses]
            torch.distributed.broadcast_object_list(losses, src=0)
            losses = losses[0]
        log(f"step {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
        stored = ckpt.training_state.get('val_loss') if ckpt is not None and local_iter_num == 0 else None
        if stored is not None:
            # the stored loss came from the saving run's evaluation batches: it can only match the same batches
            theirs = ckpt.training_state.get('config') or {}
            differ = [f"{k} {theirs[k]} then, {config[k]} now" for k in ('dataset', 'batch_size', 'block_size', 'eval_iters')
                      if k in theirs and theirs[k] != config[k]]
            why = f"; not comparable, other evaluation batches: {', '.join(differ)}" if differ else ''
            log(resume_check_line(losses['val'], stored, why))
        if wandb_log and master_process:
            wandb_run.log({"iter": iter_num, "train/loss": losses['train'], "val/loss": losses['val'], "lr": lr,
                           **({"mfu": running_mfu*100} if running_mfu >= 0 else {})}) # -1: not measured yet
        if losses['val'] < best_val_loss or always_save_checkpoint:
            best_val_loss = min(best_val_loss, losses['val'])
            if iter_num > 0 and not eval_only and not (in_place and local_iter_num == 0): # nor re-saves it untrained
                try: # a failed save (disk full, a diverged adapter) ends the run; the last good checkpoint stays
                    saving = True
                    save_checkpoint(out_dir, raw_model, optimizer if save_optimizer else None, iter_num,
                                    best_val_loss, losses['val'], config, scaler, rng_before_batch, async_save,
                                    sharded=fsdp, log=log)
                    saved = True
                finally:
                    saving = False
                if ctrl_c:
                    interrupted(signal.SIGINT, None)
                if wandb_log and master_process:
                    wandb_run.log({"iter": iter_num, "checkpoint/step": iter_num, "checkpoint/dir": out_dir})
    # termination: checked after the save, so the last checkpoint holds every step trained
    if eval_only or iter_num >= max_iters:
        break

    # forward backward update, with optional gradient accumulation to simulate larger batch size
    loss, (X, Y) = train_step(model, optimizer, (X, Y), next_train_batch, gradient_accumulation_steps,
                               scaler, ctx, grad_clip, ddp and not fsdp)

    # timing and logging
    t1 = time.time()
    dt = t1 - t0
    t0 = t1
    if iter_num % log_interval == 0 and master_process:
        lossf = loss.item() # a wait for the GPU: read only when logged, as in nanoGPT
        if local_iter_num >= 5: # let the training loop settle a bit
            mfu = raw_model.estimate_mfu(batch_size * gradient_accumulation_steps, dt)
            running_mfu = mfu if running_mfu == -1.0 else 0.9*running_mfu + 0.1*mfu
        print(f"iter {iter_num}: loss {lossf:.6f}, time {dt*1000:.2f}ms, mfu {running_mfu*100:.2f}%")
    iter_num += 1
    local_iter_num += 1

wait_for_saves() # the last checkpoint (async_save) is committed before the run ends
unsaved = nothing_saved_note(config, saved, local_iter_num, iter_num, in_place, resume_path, best_val_loss)
if unsaved: # an unchanged out_dir is no surprise
    log(f"note: {unsaved}")
if wandb_log and master_process:
    wandb_run.finish() # writes the run's summary (and, offline, its files) now
if ddp:
    end_process_group()
