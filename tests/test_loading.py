"""Model loading: local directories, dtype and quantization choices, and clear errors."""

from __future__ import annotations

import json
import shutil

import pytest
from huggingface_hub import errors

import mlx.core as mx
import mlx_gemma
from mlx_gemma import loading
from mlx_gemma.loading import ModelLoadError


def copy_model(tiny_dir, tmp_path, drop=()):
    target = tmp_path / "model"
    shutil.copytree(tiny_dir, target)
    for name in drop:
        (target / name).unlink()
    return target


def test_default_dtype_is_float32_on_linux(runtime):
    assert runtime.loaded.dtype == "float32"
    assert runtime.model.model.embed_tokens.weight.dtype == mx.float32


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_dtype_choice(tiny_dir, dtype):
    runtime = mlx_gemma.load(tiny_dir, dtype=dtype)
    assert runtime.model.layers[0].self_attn.q_proj.weight.dtype == getattr(mx, dtype)


@pytest.mark.parametrize("bits", [4, 8])
def test_quantize_every_linear_and_the_embedding(tiny_dir, bits):
    runtime = mlx_gemma.load(tiny_dir, quantize=bits)
    assert runtime.loaded.quantization == {"group_size": 64, "bits": bits}
    assert runtime.model.layers[0].mlp.down_proj.bits == bits
    assert runtime.model.model.embed_tokens.bits == bits
    assert runtime.generate(prompt="Hi", temperature=0, max_tokens=3).usage.completion_tokens >= 1


@pytest.mark.parametrize("drop, message", [
    (["config.json"], "no config.json in"),
    (["model.safetensors"], "no *.safetensors weights in"),
    (["tokenizer.json"], "no tokenizer.json in"),
])
def test_missing_files(tiny_dir, tmp_path, drop, message):
    with pytest.raises(ModelLoadError) as err:
        mlx_gemma.load(copy_model(tiny_dir, tmp_path, drop))
    assert message in str(err.value)


def test_pickled_weights_are_named(tiny_dir, tmp_path):
    target = copy_model(tiny_dir, tmp_path, ["model.safetensors"])
    (target / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(ModelLoadError, match=r"pickled \*\.bin weights are not read"):
        mlx_gemma.load(target)


def test_unserved_model_type(tiny_dir, tmp_path):
    target = copy_model(tiny_dir, tmp_path)
    config = json.loads((target / "config.json").read_text())
    (target / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    with pytest.raises(ModelLoadError, match="model_type 'llama' .* is not served"):
        mlx_gemma.load(target)


def test_mismatched_weights(tiny_dir, tmp_path):
    target = copy_model(tiny_dir, tmp_path)
    config = json.loads((target / "config.json").read_text())
    (target / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))
    with pytest.raises(ModelLoadError, match="weights do not match"):
        mlx_gemma.load(target)


def test_unknown_path_and_file(tiny_dir):
    with pytest.raises(ModelLoadError, match="no model directory at './nowhere/model'"):
        mlx_gemma.load("./nowhere/model")
    with pytest.raises(ModelLoadError, match="is a file"):
        mlx_gemma.load(tiny_dir / "config.json")


@pytest.mark.parametrize("kwargs, message", [
    ({"dtype": "int8"}, "dtype='int8' is not supported"),
    ({"quantize": 3}, "quantize=3 is not supported: use 4 or 8"),
])
def test_bad_dtype_and_quantize(tiny_dir, kwargs, message):
    with pytest.raises(ModelLoadError, match=message):
        mlx_gemma.load(tiny_dir, **kwargs)


class FakeResponse:
    headers: dict = {}
    status_code = 401
    url = "https://huggingface.co"
    request = None


@pytest.mark.parametrize("error, message", [
    (errors.GatedRepoError("gated", response=FakeResponse()), "google/gemma-2b-it is gated: accept its license"),
    (errors.RepositoryNotFoundError("missing", response=FakeResponse()), "no model 'google/gemma-2b-it' on the Hugging Face Hub"),
    (ConnectionError("no route to host"), "cannot download google/gemma-2b-it"),
    (errors.LocalEntryNotFoundError("offline\nmore lines"), "not in the local cache (LocalEntryNotFoundError: offline); connect"),
])
def test_hub_errors_say_how_to_fix(monkeypatch, error, message):
    def fake_snapshot_download(repo_id, **kwargs):
        raise error
    monkeypatch.setattr("huggingface_hub.snapshot_download", fake_snapshot_download)
    with pytest.raises(ModelLoadError) as err:
        loading.resolve_model_dir("google/gemma-2b-it")
    assert message in str(err.value)
    assert "--model /path/to/gemma-2b-it" in str(err.value)


def test_hub_download_asks_only_for_model_files(monkeypatch, tiny_dir):
    calls = []
    def fake_snapshot_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        return str(tiny_dir)
    monkeypatch.setattr("huggingface_hub.snapshot_download", fake_snapshot_download)
    assert loading.resolve_model_dir("google/gemma-2b-it") == tiny_dir
    assert calls[0][1]["local_files_only"] is True
    assert "*.safetensors" in calls[0][1]["allow_patterns"] and "*.bin" not in calls[0][1]["allow_patterns"]
