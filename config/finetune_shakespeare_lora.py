# config/finetune_shakespeare.py with LoRA: GPT-2 frozen, adapters on attention and MLP. Saved like every checkpoint
# here: merged weights (a plain GPT-2, for transformers too via convert_checkpoints.py --to hf), plus adapter.pt.
# On a laptop: --init_from=gpt2 --device=cpu --dtype=float32 --max_iters=2 (GPT-2 small, 124M).
import time

out_dir = 'out-shakespeare-lora'
init_from = 'gpt2-xl'
dataset = 'shakespeare'
eval_interval = 5
eval_iters = 40
wandb_log = False
wandb_project = 'shakespeare'
wandb_run_name = 'ft-lora-' + str(time.time())
always_save_checkpoint = False
block_size = 1024
batch_size = 1
gradient_accumulation_steps = 32
max_iters = 20
attn_lora_rank = 8
mlp_lora_rank = 8
lora_alpha = 16.0
learning_rate = 1e-3 # adapters start at zero and take a larger rate than a full fine-tune
decay_lr = False
