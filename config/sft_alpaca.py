# sft_alpaca: auto-g-nano's SFT recipe (HF card "SFT variant") on the gpt2_124m checkpoint: the Alpaca template,
# loss on the response only, 3 epochs, AdamW peak 5e-5 with cosine decay. Warmup, batch and weight decay for that
# run are not published: ours are 3% of the steps, 32 x 1024 tokens a step, no decay (our choices).
# auto-g-nano tuned on Dolly-15k alone; offline we mix the local Dolly (first 6,400 rows), Alpaca-GPT-4 (999) and
# GSM8K train (7,473) copies:
#   python prepare_sft.py --format alpaca --tokenizer gpt2 --out_dir data/sft_alpaca_gpt2 \
#       --source dolly_local --source alpaca_gpt4_local --source gsm8k_local
# With the hub: --source dolly (all 15,011 rows, auto-g-nano's set) instead.
init_from = "out/gpt2_124m"
out_dir = "out/sft_alpaca"
data_dir = "data/sft_alpaca_gpt2"
chat_format = "alpaca"
learning_rate = 5e-5
min_lr = 5e-6                       # cosine to 0.1x, as auto-g-nano's older finetune.py
lr_schedule = "cosine"
warmup_frac = 0.03
epochs = 3.0
weight_decay = 0.0
batch_size = 16
total_batch_tokens = 32768
eval_interval = 50
eval_iters = 3                      # 3 x 16 windows: about the whole ~40k-token validation split
