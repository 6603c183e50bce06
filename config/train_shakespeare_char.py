# nanoGPT's baby GPT on tiny Shakespeare, characters. Prepare the data first (downloads once, or takes a file):
#   python data/prepare.py --dataset shakespeare_char [--input path/to/input.txt]
# These are CPU settings (a few minutes on a laptop). nanoGPT's GPU settings: n_layer = 6, n_head = 6,
# n_embd = 384, block_size = 256, batch_size = 64, dropout = 0.2, learning_rate = 1e-3, max_iters = 5000,
# device = 'cuda', compile = True.
out_dir = 'out-shakespeare-char'
dataset = 'shakespeare_char'
eval_interval = 250
eval_iters = 20
log_interval = 10
always_save_checkpoint = False # only save when val improves
n_layer = 4
n_head = 4
n_embd = 128
block_size = 64
batch_size = 12
dropout = 0.0
learning_rate = 1e-3
max_iters = 2000
lr_decay_iters = 2000
min_lr = 1e-4
beta2 = 0.99
warmup_iters = 100
