#!/usr/bin/env python3
"""Write a small random Gemma checkpoint in Hugging Face layout, for tests and demos.

    python scripts/make_tiny_model.py OUT_DIR [--shape 2b|7b|gemma3] [--seed 0]

The checkpoint has Gemma's structure at toy sizes: `2b` is multi-query (one KV head), `7b`
multi-head; as in Gemma-7B, heads * head_dim differs from hidden_size. `gemma3` is a Gemma 3
text model (Gemma3ForCausalLM, model_type gemma3_text): 4 layers, multi-query, a sliding window
of 4 on layers 0, 1 and 3 and global attention on layer 2, RoPE bases 1e6 (global) and 1e4
(local) in transformers 5's per-layer-type `rope_parameters`, query_pre_attn_scalar 24 (not
head_dim), q/k norms and the four per-layer norms all non-zero so that the (1 + w) convention
matters.

The tokenizer is a small SentencePiece-style BPE (spaces as U+2581, byte fallback, no dummy
prefix) with Gemma's special tokens and chat template, so chat, raw mode and streaming
detokenization behave as with the real model. Outputs are deterministic for a given seed.
Needs numpy, safetensors and tokenizers (all dependencies of mlx-gemma); not torch.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors, trainers

SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>"]
BYTE_TOKENS = [f"<0x{b:02X}>" for b in range(256)]
MERGED_VOCAB_SIZE = 200  # learned tokens on top of the specials, bytes and base characters

GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}{% if (message['role'] == 'assistant') %}{% set role = 'model' %}"
    "{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)

CORPUS = """
Water boils at a temperature of one hundred degrees Celsius at sea level.
The quick brown fox jumps over the lazy dog. Hello, world! How are you today?
Gemma is a family of lightweight open models. A model answers the user in turns.
The capital of France is Paris. The capital of Japan is Tokyo. Write a short poem.
user model system assistant the and of to in is that for on with as at by from
Tell me a story about a cat who lives in a library and reads books at night.
""".strip()

BASE_CHARS = list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,!?'\"-:;()\n\u2581")

# Output projections are scaled up so the layers, not the tied embedding, decide the next token:
# with plain 1/sqrt(fan_in) init every position would predict its own input token.
RESIDUAL_GAIN = 6.0
# Gemma 3 normalizes each block's output (post_attention / post_feedforward norms), so the output
# projections' gain is lost; these norms' scales (1 + w) sit near this gain instead.
POST_NORM_GAIN = 4.0

SHAPES = {
    "2b": {"num_attention_heads": 4, "num_key_value_heads": 1},
    "7b": {"num_attention_heads": 4, "num_key_value_heads": 4},
    "gemma3": {"num_attention_heads": 4, "num_key_value_heads": 1},
}

# Gemma 3: layer 2 global, the others sliding (sliding_window_pattern 3 says the same to readers
# that predate layer_types); RoPE per layer type, as transformers 5 writes it.
GEMMA3_LAYER_TYPES = ["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"]
GEMMA3_ROPE = {
    "full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
    "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
}


def learned_bpe() -> tuple[list[str], list[tuple[str, str]]]:
    """Learn merges on the corpus; return the learned tokens (in id order) and merges."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    trainer = trainers.BpeTrainer(
        vocab_size=len(BASE_CHARS) + MERGED_VOCAB_SIZE,
        initial_alphabet=BASE_CHARS,
        special_tokens=[],
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS.splitlines(), trainer)
    spec = json.loads(tok.to_str())["model"]
    learned = sorted(spec["vocab"], key=spec["vocab"].get)
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in spec["merges"]]
    return learned, merges


def build_tokenizer() -> Tokenizer:
    """Gemma-style tokenizer: specials at ids 0..6, then 256 byte tokens, then BPE pieces."""
    learned, merges = learned_bpe()
    pieces = SPECIAL_TOKENS + BYTE_TOKENS + [p for p in learned if p not in SPECIAL_TOKENS]
    vocab = {piece: i for i, piece in enumerate(pieces)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", 2)]
    )
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return tok


def tokenizer_config() -> dict:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<bos>",
        "eos_token": "<eos>",
        "pad_token": "<pad>",
        "unk_token": "<unk>",
        "add_bos_token": True,
        "add_eos_token": False,
        "model_max_length": 8192,
        "chat_template": GEMMA_CHAT_TEMPLATE,
    }


def model_config(shape: str, vocab_size: int) -> dict:
    if shape == "gemma3":
        return gemma3_config(vocab_size)
    return {
        "architectures": ["GemmaForCausalLM"],
        "model_type": "gemma",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "head_dim": 32,
        **SHAPES[shape],
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "max_position_embeddings": 8192,
        "vocab_size": vocab_size,
        "hidden_act": "gelu",
        "hidden_activation": "gelu_pytorch_tanh",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "pad_token_id": 0,
        "eos_token_id": 1,
        "bos_token_id": 2,
        "tie_word_embeddings": True,
        "torch_dtype": "float32",
    }


def gemma3_config(vocab_size: int) -> dict:
    return {
        "architectures": ["Gemma3ForCausalLM"],
        "model_type": "gemma3_text",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": len(GEMMA3_LAYER_TYPES),
        "head_dim": 32,
        **SHAPES["gemma3"],
        "layer_types": GEMMA3_LAYER_TYPES,
        "sliding_window": 4,
        "sliding_window_pattern": 3,
        "rope_parameters": GEMMA3_ROPE,
        "query_pre_attn_scalar": 24,
        "final_logit_softcapping": None,
        "attn_logit_softcapping": None,
        "rms_norm_eps": 1e-6,
        "max_position_embeddings": 512,
        "vocab_size": vocab_size,
        "hidden_activation": "gelu_pytorch_tanh",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "pad_token_id": 0,
        "eos_token_id": 1,
        "bos_token_id": 2,
        "tie_word_embeddings": True,
        "torch_dtype": "float32",
    }


def random_weights(config: dict, seed: int) -> dict[str, np.ndarray]:
    """HF GemmaForCausalLM / Gemma3ForCausalLM names; scales chosen so logits are well spread
    (no near-ties). Gemma 3's extra tensors are drawn after each layer's Gemma 1 ones."""
    rng = np.random.default_rng(seed)
    d, ff, hd = config["hidden_size"], config["intermediate_size"], config["head_dim"]
    nq, nkv = config["num_attention_heads"], config["num_key_value_heads"]

    def dense(out_dim: int, in_dim: int, gain: float = 1.0) -> np.ndarray:
        return (gain * rng.standard_normal((out_dim, in_dim)) / np.sqrt(in_dim)).astype(np.float32)

    def norm(dim: int = d) -> np.ndarray:
        return (0.1 * rng.standard_normal(dim)).astype(np.float32)

    weights = {"model.embed_tokens.weight": (0.25 * rng.standard_normal((config["vocab_size"], d))).astype(np.float32)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        weights[p + "input_layernorm.weight"] = norm()
        weights[p + "post_attention_layernorm.weight"] = norm()
        weights[p + "self_attn.q_proj.weight"] = dense(nq * hd, d)
        weights[p + "self_attn.k_proj.weight"] = dense(nkv * hd, d)
        weights[p + "self_attn.v_proj.weight"] = dense(nkv * hd, d)
        weights[p + "self_attn.o_proj.weight"] = dense(d, nq * hd, RESIDUAL_GAIN)
        weights[p + "mlp.gate_proj.weight"] = dense(ff, d)
        weights[p + "mlp.up_proj.weight"] = dense(ff, d)
        weights[p + "mlp.down_proj.weight"] = dense(d, ff, RESIDUAL_GAIN)
        if config["model_type"] == "gemma3_text":  # post_attention_layernorm is a post-norm here
            weights[p + "post_attention_layernorm.weight"] += np.float32(POST_NORM_GAIN - 1)
            weights[p + "self_attn.q_norm.weight"] = norm(hd)
            weights[p + "self_attn.k_norm.weight"] = norm(hd)
            weights[p + "pre_feedforward_layernorm.weight"] = norm()
            weights[p + "post_feedforward_layernorm.weight"] = norm() + np.float32(POST_NORM_GAIN - 1)
    weights["model.norm.weight"] = norm()
    return weights


def write_tiny_model(out_dir: str | Path, shape: str = "2b", seed: int = 0) -> Path:
    """Write config, weights and tokenizer files into out_dir; return it as a Path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    config = model_config(shape, tokenizer.get_vocab_size())
    save_file(random_weights(config, seed), str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    tokenizer.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(), indent=2) + "\n")
    specials = {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>",
                "additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]}
    (out / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps({"bos_token_id": 2, "eos_token_id": [1, 6]}) + "\n")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="2b")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out = write_tiny_model(args.out_dir, args.shape, args.seed)
    family = "Gemma 3" if args.shape == "gemma3" else "Gemma"
    print(f"wrote a tiny {family} ({args.shape} shape, seed {args.seed}) to {out}")


if __name__ == "__main__":
    main()
