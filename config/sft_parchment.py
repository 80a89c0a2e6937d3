# sft_parchment: ParchmentLM's instruct-v3 recipe (sft_train.py) on the parchment_166m checkpoint (cl100k_base).
# Data: Dolly-15k-cleaned, categories closed_qa / open_qa / information_extraction, context appended to the
# instruction; ProCreations/SimpleMath, 2,500 problems per operator. Template `system\n...<|endoftext|>\nuser\n...`,
# pad <|endofprompt|> (distinct from the end-of-text stop token), every example padded to 1024: --layout pad.
#   python prepare_sft.py --format parchment --tokenizer cl100k_base --layout pad --block_size 1024 \
#       --source dolly_parchment --source simplemath --out_dir data/sft_parchment_cl100k
# Offline: --source dolly_local --source gsm8k_local (no category field there, so no filter; GSM8K for SimpleMath).
# Hyperparameters: HF Trainer, 8 epochs, 16 x 2 = 32 sequences of 1024 a step, lr 1e-4, warmup 5% of the steps,
# cosine to 0, AdamW with the Trainer's defaults (betas 0.9 / 0.999, no weight decay).
init_from = "out/parchment_166m"
out_dir = "out/sft_parchment"
data_dir = "data/sft_parchment_cl100k"
chat_format = "parchment"
learning_rate = 1e-4
min_lr = 0.0
lr_schedule = "cosine"
warmup_frac = 0.05
epochs = 8.0
beta1 = 0.9
beta2 = 0.999
weight_decay = 0.0
batch_size = 16
total_batch_tokens = 32768          # 32 x 1024
eval_interval = 100
eval_iters = 10
