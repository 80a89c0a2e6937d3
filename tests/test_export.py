"""export.py: the exported safetensors + config.json reproduce the checkpoint's logits."""
import os

import pytest
import torch

from export import export, load_exported
from model import GPT, GPTConfig, load_checkpoint


@pytest.mark.parametrize("tied", [True, False])
def test_export_round_trip(tmp_path, tied):
    torch.manual_seed(0)
    cfg = GPTConfig(n_layer=2, n_embd=32, n_head=4, n_kv_head=2, ffn_hidden=64, vocab_size=100, block_size=16,
                    tie_embeddings=tied)
    model = GPT(cfg)
    torch.save({"model": model.state_dict(), "config": {**vars(cfg), "tokenizer": "gpt2"}, "step": 3},
               tmp_path / "ckpt.pt")
    out = export(str(tmp_path), str(tmp_path / "export"))
    again = load_exported(out)
    idx = torch.randint(0, 100, (2, 9))
    torch.testing.assert_close(again(idx)[0], load_checkpoint(str(tmp_path))[0](idx)[0], rtol=0, atol=0)
    assert os.path.exists(os.path.join(out, "config.json"))


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        export(str(tmp_path / "none"), str(tmp_path / "x"))
