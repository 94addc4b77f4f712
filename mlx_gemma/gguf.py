"""GGUF file -> a Hugging Face-style model directory that loading.py reads, cached on disk.

Contract: `convert(path)` returns a directory holding config.json, model.safetensors (float32,
every tensor dequantized), tokenizer.json and tokenizer_config.json for a GGUF file of a Gemma
(`gemma`) or Gemma 3 (`gemma3`) model. The first call reads the file with the `gguf` package
(the llama.cpp project's own reader and dequantizers, for every type the file uses) and builds
the tokenizer from the file's metadata with transformers' GGUF tokenizer support (plus the
user-defined runs of spaces as whole tokens, so the ids equal llama.cpp's); it writes the
result into a cache directory keyed by the file's path, size and modification time and the
converter's version (`<stem>-<16 hex digits>`), atomically (temp directory + rename). Later
calls return the cached directory at once. Every call also deletes the other conversions of the
same file (earlier converter versions, or the file before it changed), which no key reaches
again: only directories of that name form whose source.json names this file.

Names map from llama.cpp's (`blk.3.attn_q.weight`) to Hugging Face's
(`model.layers.3.self_attn.q_proj.weight`). llama.cpp stores Gemma's RMSNorm weights as 1 + w;
they are stored back as w, the form our models (and transformers) use. An `output.weight` becomes
an untied `lm_head.weight` (tie_word_embeddings false), as llama.cpp uses it when present.

Gemma 3 settings follow llama.cpp: `gemma3.rope.scaling.type`/`.factor` (linear x8 on the 4B,
12B and 27B) become rope_scaling {"rope_type": "linear", "factor": F}; the local RoPE base is
10000 (llama.cpp ignores `gemma3.rope.freq_base_swa`); query_pre_attn_scalar is head_dim, except on the 27B
(62 blocks), where it is hidden_size // head_count (168, as in its Hugging Face config).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

CONVERTER_VERSION = "6"
TOP_LEVEL = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
IN_BLOCK = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "attn_norm": "input_layernorm", "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm", "post_ffw_norm": "post_feedforward_layernorm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
SPECIAL_TOKENS = {"bos_token": "bos_token_id", "eos_token": "eos_token_id", "unk_token": "unknown_token_id",
                  "pad_token": "padding_token_id"}
USER_DEFINED = 4  # tokenizer.ggml.token_type of SentencePiece's user-defined symbols
GEMMA1_BLOCK = {**IN_BLOCK, "ffn_norm": "post_attention_layernorm"}  # Gemma 1 has one norm before the MLP
GEMMA3_27B_BLOCKS = 62  # llama.cpp scales attention by hidden_size // heads on this size alone, as HF's config does


class GGUFError(ValueError):
    """The GGUF file cannot be served; the message says why."""


def default_cache_root() -> Path:
    env = os.environ.get("MLX_GEMMA_CACHE")
    base = Path(env).expanduser() if env else Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mlx-gemma"
    return base / "converted"


def cache_dir_for(path: Path, cache_root: Path) -> Path:
    stat = path.stat()
    key = f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}:{CONVERTER_VERSION}"
    return cache_root / f"{path.stem}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def convert(path: str | Path, cache_root: str | Path | None = None) -> Path:
    """The converted directory for a GGUF file: from the cache, or written now."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise GGUFError(f"no GGUF file at {str(path)!r}")
    target = cache_dir_for(path, Path(cache_root) if cache_root else default_cache_root())
    if not (target / "config.json").is_file():
        _write_atomically(path, target)
    remove_stale_conversions(path, target)
    return target


def _write_atomically(path: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".converting-", dir=target.parent))
    try:
        write_converted(path, staging)
        os.replace(staging, target)
    except OSError:
        if not (target / "config.json").is_file():  # a concurrent conversion did not win either
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def remove_stale_conversions(path: Path, keep: Path) -> list[Path]:
    """Delete the conversions of `path` beside `keep` other than `keep`; return them.

    Only directories this converter made: named `<stem>-<16 hex digits>` (as cache_dir_for names
    them), not links, with a source.json whose "gguf" is this file's resolved path."""
    name = re.compile(re.escape(path.stem) + r"-[0-9a-f]{16}")
    source = str(path.resolve())
    stale = [d for d in keep.parent.iterdir() if d != keep and name.fullmatch(d.name) and not d.is_symlink()
             and d.is_dir() and _source_of(d) == source]
    for directory in stale:
        shutil.rmtree(directory, ignore_errors=True)
    return stale


def _source_of(converted: Path) -> str | None:
    try:
        return json.loads((converted / "source.json").read_text()).get("gguf")
    except (OSError, ValueError, AttributeError):
        return None


def write_converted(path: Path, out: Path) -> None:
    from gguf import GGUFReader
    from safetensors.numpy import save_file

    try:
        reader = GGUFReader(str(path))
    except (ValueError, IndexError) as exc:  # bad magic, an empty or a truncated file
        raise GGUFError(f"not a complete GGUF file ({exc}): download it again") from exc
    fields = metadata(reader)
    config = read_config(fields)
    weights = read_weights(reader, config["model_type"])
    config["vocab_size"] = int(weights["model.embed_tokens.weight"].shape[0])
    config["tie_word_embeddings"] = "lm_head.weight" not in weights  # llama.cpp: output.weight if present
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    write_tokenizer(reader, out)
    (out / "source.json").write_text(json.dumps({"gguf": str(path.resolve()), "name": fields.get("general.name")}))


def metadata(reader: Any) -> dict[str, Any]:
    """Scalar and string metadata (arrays such as the vocabulary are left out)."""
    values = {}
    for name, field in reader.fields.items():
        if name.startswith("tokenizer.ggml.") and name.endswith(("tokens", "scores", "token_type", "merges")):
            continue
        try:
            values[name] = field.contents()
        except Exception:  # noqa: BLE001 - a field type this reader cannot decode is not needed
            continue
    return values


def read_config(fields: dict[str, Any]) -> dict[str, Any]:
    arch = fields.get("general.architecture")
    if arch not in ("gemma", "gemma3"):
        raise GGUFError(f"GGUF architecture {arch!r} is not served: mlx-gemma runs gemma and gemma3 files")
    get = lambda key, default=None: fields.get(f"{arch}.{key}", default)  # noqa: E731
    head_dim = int(get("attention.key_length"))
    config = {
        "model_type": "gemma" if arch == "gemma" else "gemma3_text",
        "hidden_size": int(get("embedding_length")), "num_hidden_layers": int(get("block_count")),
        "intermediate_size": int(get("feed_forward_length")),
        "num_attention_heads": int(get("attention.head_count")),
        "num_key_value_heads": int(get("attention.head_count_kv", get("attention.head_count"))),
        "head_dim": head_dim, "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(get("rope.freq_base", 10000.0)),
        "max_position_embeddings": int(get("context_length", 8192)), "torch_dtype": "float32",
    }
    if arch == "gemma3":
        config.update(_gemma3_settings(get, config))
    return config


def _gemma3_settings(get: Callable[..., Any], config: dict[str, Any]) -> dict[str, Any]:
    """Gemma 3's settings as llama.cpp reads them, with its defaults where the file says nothing."""
    blocks, heads = config["num_hidden_layers"], config["num_attention_heads"]
    scalar = config["hidden_size"] // heads if blocks == GEMMA3_27B_BLOCKS else config["head_dim"]
    settings = {"rope_local_base_freq": 10000.0,  # llama.cpp sets it for Gemma 3 whatever the file says
                "sliding_window": int(get("attention.sliding_window", 512)), "sliding_window_pattern": 6,
                "query_pre_attn_scalar": int(scalar), "final_logit_softcapping": get("final_logit_softcapping")}
    scaling = _rope_scaling(get("rope.scaling.type"), get("rope.scaling.factor"))
    return settings | ({"rope_scaling": scaling} if scaling else {})


def _rope_scaling(kind: Any, factor: Any) -> dict[str, Any] | None:
    """gemma3.rope.scaling.* as a Hugging Face rope_scaling entry (linear x8 on the 4B, 12B and 27B)."""
    if kind in (None, "none") or (kind == "linear" and float(factor or 1.0) == 1.0):
        return None
    if kind != "linear":
        raise GGUFError(f"gemma3.rope.scaling.type {kind!r} is not supported: Gemma 3 uses none or linear")
    return {"rope_type": "linear", "factor": float(factor)}


def hf_name(name: str, model_type: str) -> str | None:
    stem, _, leaf = name.rpartition(".")
    if stem in TOP_LEVEL:
        return f"{TOP_LEVEL[stem]}.{leaf}"
    parts = stem.split(".")
    block = GEMMA1_BLOCK if model_type == "gemma" else IN_BLOCK
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in block:
        return f"model.layers.{parts[1]}.{block[parts[2]]}.{leaf}"
    return None


def read_weights(reader: Any, model_type: str) -> dict[str, np.ndarray]:
    from gguf.quants import dequantize

    weights, unknown = {}, []
    for tensor in reader.tensors:
        name = hf_name(tensor.name, model_type)
        if name is None:
            unknown.append(tensor.name)
            continue
        array = np.ascontiguousarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
        weights[name] = array - 1.0 if name.endswith("norm.weight") else array
    if unknown:
        raise GGUFError(f"GGUF tensors with no place in a {model_type} model: {', '.join(unknown[:5])}")
    return weights


def _space_runs(tokens: list[str], types: list[int]) -> list[Any]:
    """The user-defined symbols made of spaces, as added tokens matched after normalization.

    SentencePiece (and llama.cpp) match user-defined symbols whole, longest first; transformers'
    converter leaves these runs (2 to 31 spaces in Gemma 3) to the BPE merges, which build runs of
    16 at most, so 32 or more spaces would become ids the model never saw."""
    from tokenizers import AddedToken

    runs = [token for token, kind in zip(tokens, types) if kind == USER_DEFINED and len(token) > 1
            and set(token) == {" "}]
    return [AddedToken("\u2581" * len(run), normalized=True, special=False) for run in runs]


def write_tokenizer(reader: Any, out: Path) -> None:
    """Build the tokenizer from the file's metadata with transformers' GGUF converter; save tokenizer.json.

    The metadata is read with the `gguf` package (transformers' own GGUF reader needs torch).
    """
    try:
        from transformers.integrations.gguf.gguf_tokenizer_mapping import (
            GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer)
    except ImportError as exc:
        raise GGUFError("reading a GGUF tokenizer needs transformers >= 5: pip install 'mlx-gemma[demo]'") from exc
    from tokenizers.processors import TemplateProcessing

    fields = {name: reader.fields[name].contents() for name in reader.fields if name.startswith("tokenizer.")}
    renames = GGUF_TOKENIZER_MAPPING["tokenizer"]
    tokenizer_dict = {renames[key[len("tokenizer."):]]: value for key, value in fields.items()
                      if key[len("tokenizer."):] in renames}
    backend, _ = convert_gguf_tokenizer(reader.fields["general.architecture"].contents(), tokenizer_dict)
    tokens = tokenizer_dict["tokens"]
    backend.add_tokens(_space_runs(tokens, fields.get("tokenizer.ggml.token_type", [])))
    special = {name: tokens[fields[f"tokenizer.ggml.{key}"]] for name, key in SPECIAL_TOKENS.items()
               if f"tokenizer.ggml.{key}" in fields}
    add_bos = bool(fields.get("tokenizer.ggml.add_bos_token", True))
    if add_bos and "bos_token" in special:  # as Hugging Face's Gemma tokenizer does (mlx-lm relies on it)
        bos = special["bos_token"]
        backend.post_processor = TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A $B:1",
                                                    special_tokens=[(bos, fields["tokenizer.ggml.bos_token_id"])])
    backend.save(str(out / "tokenizer.json"))
    config = {**special, "add_bos_token": add_bos,
              "add_eos_token": bool(fields.get("tokenizer.ggml.add_eos_token", False))}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
