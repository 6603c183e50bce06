# Example 1, step 1: train a standard (adapter-free) baby GPT on the embedded corpus.
# ~1 minute on a 2-core laptop CPU. Then: python train.py config/train_with_lora.py
# On a GPU: device = 'cuda', dtype = 'bfloat16', compile = True, and scale the model up
# (n_layer = 6, n_head = 6, n_embd = 384, block_size = 256, batch_size = 64, max_iters = 5000).
out_dir = 'out-standard'
dataset = 'pydocs_char'
n_layer = 4
n_head = 4
n_embd = 128
block_size = 128
batch_size = 16
max_iters = 500
lr_decay_iters = 500
eval_interval = 100
eval_iters = 20
log_interval = 50
learning_rate = 2e-3
min_lr = 2e-4
warmup_iters = 50
