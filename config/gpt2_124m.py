# gpt2_124m: the speed reference everyone knows, with a modern block. 12 layers, d=768, 12 heads, context 1024,
# tied embeddings, gpt2 vocabulary padded to 50304. SwiGLU with F=2048 costs the same FLOPs per token as GPT-2's
# 4d=3072 GELU MLP (3 x 768 x 2048 = 2 x 768 x 3072); RoPE instead of learned positions.
# Training recipe: llm.c's GPT-2 (124M) on FineWeb 10B: 0.5M tokens/step, lr 6e-4, warmup 700, wd 0.1, decay to 0.
out_dir = "out/gpt2_124m"
data_dir = "data/fineweb_edu"
n_layer = 12
n_embd = 768
n_head = 12
n_kv_head = 12
ffn_hidden = 2048
mlp = "swiglu"
pos = "rope"
tie_embeddings = True
vocab_size = 50257
vocab_pad_multiple = 64             # 50257 -> 50304 rows
block_size = 1024
batch_size = 16
total_batch_tokens = 524288         # 16 x 1024 x 32 on one GPU; 16 x 1024 x 4 x 8 on eight
learning_rate = 6e-4
min_lr = 0.0
warmup_iters = 700
max_iters = 19073                   # 10B tokens
lr_schedule = "cosine"
beta1 = 0.9
beta2 = 0.95
weight_decay = 0.1
