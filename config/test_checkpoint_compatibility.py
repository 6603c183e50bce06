# A tiny standard model for test_checkpoint_compatibility.py: seconds on a CPU.
# Pass --out_dir, --resume_from and adapter settings on the command line.
dataset = 'pydocs_char'
n_layer = 2
n_head = 2
n_embd = 32
block_size = 32
batch_size = 4
max_iters = 20
lr_decay_iters = 100
warmup_iters = 5
eval_interval = 10
eval_iters = 4
log_interval = 1
