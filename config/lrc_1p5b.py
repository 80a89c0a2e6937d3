# lrc_1p5b (JitaiHao/LRC-1.5B, "Low-Rank Clone" of Llama-3.2-3B-Instruct): 28 layers, d=1536, 24 query heads and
# 8 KV heads of dim 128 (the teacher's head size, so q has 3072 dims, more than d), SwiGLU 8192, vocabulary
# 128,256 (Llama 3), tied, RoPE theta 500000, RMSNorm eps 1e-5. Recipe (LowRankClone README): AdamW lr 1e-4,
# linear decay (poly power 1) to 0, warmup 0.5% of 208,000 steps, betas (0.9, 0.999), no weight decay,
# 49,152 tokens/step (10B tokens). LRC distils from its teacher; nanoforge trains it with next-token loss only.
# The Llama-3 tokenizer is not available offline: cl100k_base (100,277 ids) stands in, and fits the vocabulary.
# Llama 3's long-context RoPE frequency scaling is not implemented (it matters only beyond 8k tokens of context).
out_dir = "out/lrc_1p5b"
data_dir = "data/fineweb_edu_cl100k"
tokenizer = "cl100k_base"
n_layer = 28
n_embd = 1536
n_head = 24
n_kv_head = 8
head_dim = 128
ffn_hidden = 8192
rope_theta = 500000.0
norm_eps = 1e-5
tie_embeddings = True
vocab_size = 128256
vocab_pad_multiple = 128
block_size = 2048
batch_size = 8
total_batch_tokens = 49152          # 3 x 2048 x 8 GPUs in the original; here 8 x 2048 x 3 on one GPU
learning_rate = 1e-4
min_lr = 0.0
warmup_iters = 1040
lr_schedule = "poly"
poly_power = 1.0
max_iters = 208000
beta1 = 0.9
beta2 = 0.999
weight_decay = 0.0
