# parchment_166m (Sslithercode/tiny-edu-166M, "ParchmentLM"): 12 layers, d=768, 12 heads (MHA), SwiGLU F=2048,
# RoPE (base 10000), RMSNorm eps 1e-6, tied embeddings, context 1024, tiktoken cl100k_base (100,277 tokens).
# Recipe (train_modal.py): AdamW betas (0.9, 0.95), wd 0.1, clip 1.0; peak 3e-4, warmup 2000, cosine to 3e-5 over
# 76,300 steps; 16 x 8 x 1024 = 131,072 tokens/step; the published run stopped at 30,000 steps (~3.9B tokens).
out_dir = "out/parchment_166m"
data_dir = "data/fineweb_edu_cl100k"
tokenizer = "cl100k_base"
n_layer = 12
n_embd = 768
n_head = 12
n_kv_head = 12
ffn_hidden = 2048
rope_theta = 10000.0
norm_eps = 1e-6
tie_embeddings = True
vocab_size = 100277
vocab_pad_multiple = 128            # 100,352 rows: room for the chat special tokens (pad distinct from EOT)
block_size = 1024
batch_size = 16
total_batch_tokens = 131072
learning_rate = 3e-4
min_lr = 3e-5
warmup_iters = 2000
lr_schedule = "cosine"
lr_decay_iters = 76300
max_iters = 30000
beta1 = 0.9
beta2 = 0.95
weight_decay = 0.1
grad_clip = 1.0
