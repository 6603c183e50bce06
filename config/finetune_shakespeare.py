# nanoGPT's fine-tuning example: OpenAI's GPT-2 XL (1.5B) on tiny Shakespeare in GPT-2 BPE tokens, a few minutes on
# one A100. The weights come through the Hugging Face cache (downloaded once; offline, from the cache).
# On a laptop: --init_from=gpt2 --device=cpu --dtype=float32 --max_iters=2 (GPT-2 small, 124M).
import time

out_dir = 'out-shakespeare'
init_from = 'gpt2-xl' # or gpt2, gpt2-medium, gpt2-large
dataset = 'shakespeare' # tiny Shakespeare, GPT-2 BPE (prepared on first use)
eval_interval = 5
eval_iters = 40
wandb_log = False
wandb_project = 'shakespeare'
wandb_run_name = 'ft-' + str(time.time())
always_save_checkpoint = False # save only when the validation loss improves
# 32,768 tokens per step (1 x 32 x 1024); the training split holds about 300k tokens: an epoch is ~9 steps
block_size = 1024
batch_size = 1
gradient_accumulation_steps = 32
max_iters = 20
learning_rate = 3e-5 # constant: a short fine-tune needs no schedule
decay_lr = False
