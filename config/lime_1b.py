# lime_1b (anarlavrenov/lime-1b): 32 layers, d=1536, 24 heads (MHA, head_dim 64), plain SiLU MLP of 6144,
# fixed sinusoidal positions, RMSNorm, tied embeddings, context 512; 20B tokens of FineWeb-Edu; polynomial decay.
# Lime's optimizer numbers are not published in any copy we could read (model card cut off), so the LR recipe here
# is a documented choice: AdamW 3e-4, warmup 2000, polynomial (power 1 = linear, the HF scheduler's default) to 3e-5,
# 0.5M tokens/step. Lime's own 50,000-token tokenizer is not available; gpt2 (50,257) is used instead.
out_dir = "out/lime_1b"
data_dir = "data/fineweb_edu"
n_layer = 32
n_embd = 1536
n_head = 24
n_kv_head = 24
ffn_hidden = 6144
mlp = "silu"
pos = "sinusoidal"
tie_embeddings = True
vocab_size = 50257
block_size = 512
batch_size = 32
total_batch_tokens = 524288
learning_rate = 3e-4
min_lr = 3e-5
warmup_iters = 2000
lr_schedule = "poly"
poly_power = 1.0
max_iters = 38147                   # 20B tokens / 524,288
beta1 = 0.9
beta2 = 0.95
weight_decay = 0.1
