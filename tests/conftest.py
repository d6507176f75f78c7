"""Shared fixtures: tiny GPT-NeoX (parallel) and GPT-2 (sequential) models saved as HF folders."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
torch.set_num_threads(2)

def _tokenizer():
    from featcircuit.lm_training import train_tokenizer
    from helpers import TEXT

    return train_tokenizer([TEXT], vocab_size=300)


def _save_neox(path, n_layers=3):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    tok = _tokenizer()
    torch.manual_seed(0)
    cfg = GPTNeoXConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=n_layers,
                        num_attention_heads=4, intermediate_size=128, max_position_embeddings=128,
                        rotary_pct=0.25, use_parallel_residual=True, bos_token_id=tok.bos_token_id,
                        eos_token_id=tok.eos_token_id)
    m = GPTNeoXForCausalLM(cfg)
    _perturb(m)
    m.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _save_gpt2(path, n_layers=3):
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = _tokenizer()
    torch.manual_seed(1)
    cfg = GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=n_layers, n_head=4, n_positions=128,
                     bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    m = GPT2LMHeadModel(cfg)
    _perturb(m)
    m.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _perturb(m):
    # Random LayerNorm gains and biases, so a test cannot pass by treating LN as the identity.
    with torch.no_grad():
        for name, p in m.named_parameters():
            if ("norm" in name or "ln" in name) and p.ndim == 1:
                p.add_(0.3 * torch.randn_like(p))


@pytest.fixture(scope="session")
def neox_dir(tmp_path_factory):
    """A 3-layer GPT-NeoX (parallel attention+MLP) saved as a HuggingFace folder."""
    return _save_neox(tmp_path_factory.mktemp("neox"))


@pytest.fixture(scope="session")
def gpt2_dir(tmp_path_factory):
    """A 3-layer GPT-2 (sequential blocks) saved as a HuggingFace folder."""
    return _save_gpt2(tmp_path_factory.mktemp("gpt2"))


@pytest.fixture(scope="session")
def neox(neox_dir):
    from featcircuit import load_model

    return load_model(str(neox_dir), device="cpu")


@pytest.fixture(scope="session")
def gpt2(gpt2_dir):
    from featcircuit import load_model

    return load_model(str(gpt2_dir), device="cpu")


@pytest.fixture(scope="session", params=["neox", "gpt2"])
def tiny_model(request):
    """Each tiny model in turn."""
    return request.getfixturevalue(request.param)


@pytest.fixture(scope="session")
def builtin():
    from featcircuit import load_model

    return load_model("stdlib-neox", device="cpu")
