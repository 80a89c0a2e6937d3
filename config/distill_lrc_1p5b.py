# distill_lrc_1p5b: how LRC-1.5B was made (LowRankClone README, "Training LRC-1.5B"): Llama-3.2-3B-Instruct
# (28 layers, d 3072, 24/8 heads x 128, SwiGLU 8192, vocabulary 128,256, tied) cloned to d = 1536 with 10B tokens
# (208,000 steps x 49,152), which gives exactly config/lrc_1p5b.py's shape (a test checks it). Needs the network
# (the teacher and its tokenizer from the hub) and 8 big GPUs:
#   huggingface-cli download meta-llama/Llama-3.2-3B-Instruct --local-dir ../models/Llama-3.2-3B-Instruct
#   python prepare_fineweb.py --tokenizer ../models/Llama-3.2-3B-Instruct/tokenizer.json \
#       --out_dir data/fineweb_edu_llama3 --max_tokens 10.5e9   # tokenizer files: issue 18; the paper mixes
#                                                                 # FineWeb-Edu, DCLM, Cosmopedia and others
#   torchrun --standalone --nproc_per_node=8 distill.py config/distill_lrc_1p5b.py
# Memory per GPU (arithmetic, not measured; DDP: every GPU holds all of it):
#   teacher, bf16 weights                         3.21B x 2 B                        =  6.4 GB
#   projections: 7 x 3072 x 1536 a layer x 28 + the embedding's = 929M, fp32 weights + grads + AdamW's two moments
#                                                 929M x 16 B                        = 14.9 GB
#   the student's weights, made each micro-batch (bf16, kept for backward): 1.61B x 2 B ~ 3.2 GB
#   activations per token: the student's for backward ~3 MB (28 layers: q/k/v 5120, o, gate/up 16384, down, ...
#   in bf16), the teacher's recorded clone points 1.55 MB (27.6k values x 2 B x 28), the logits' fp32 softmaxes
#   for CE and KL ~3 MB (128,256 x ~24 B)          ~7.5 MB x 3 x 2048 tokens           ~ 46 GB
#                                                                              total ~ 71 GB of an 80 GB GPU
# (the reference ran micro-batch 3 on H800s under DeepSpeed). Short of memory: --batch_size=1 keeps 49,152 tokens a
# step through 3 micro-steps (1 x 2048 x 8 GPUs x 3), activations ~15 GB.
# Compute per token: student fwd+bwd 6 x 1.6B = 9.6 GFLOP, teacher forward 2 x 3.2B = 6.4, and the weight
# products W_t P, made again for every micro-batch: 6 x d_s x 3.2B = 29.5 TFLOP per 3 x 2048 tokens = 4.8 GFLOP
# (a larger micro-batch amortises them). ~21 GFLOP a token, 10B tokens = 2.1e20 FLOP: ~18 hours on 8 H100s at
# 40% MFU. Checkpoints of the state: ~11 GB (fp32 projections and moments); the student's ckpt.pt: 6.4 GB fp32.
teacher = "hf:../models/Llama-3.2-3B-Instruct"
data_dir = "data/fineweb_edu_llama3"
out_dir = "out/distill_lrc_1p5b"
n_embd = 1536                       # --target_hidden_size 1536
block_size = 2048                   # --data-max-len 2048
clone_weight = 0.2                  # --aux_loss_scale_factor 0.2
kl_temperature = 40.0               # --kl_temperature 40
batch_size = 3                      # --batch-size 3 per GPU
total_batch_tokens = 49152          # 3 x 2048 x 8 GPUs, --gradient_accumulation_steps 1
max_iters = 208000                  # --max_steps 208000: 10.2B tokens
learning_rate = 1e-4                # --learning-rate 1e-4, linear decay (HF's default scheduler) to 0
min_lr = 0.0
lr_schedule = "poly"
poly_power = 1.0
warmup_iters = 1040                 # --warmup-ratio 0.005
beta1 = 0.9                         # HF Trainer's AdamW defaults, no weight decay
beta2 = 0.999
weight_decay = 0.0
grad_clip = 1.0                     # --max_grad_norm 1.0
eval_interval = 2000
eval_iters = 20
compile = False                     # not tried: functional_call and per-step hooks under torch.compile
