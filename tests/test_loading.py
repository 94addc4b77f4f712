"""Model loading: local directories, dtype and quantization choices, and clear errors."""

from __future__ import annotations

import json
import re
import types
import shutil

import pytest
from huggingface_hub import errors

import mlx.core as mx
import mlx_gemma
from mlx_gemma import loading
from mlx_gemma.loading import ModelLoadError, load_model


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


def rewrite_config(tiny_dir, tmp_path, change=None, text=None):
    target = copy_model(tiny_dir, tmp_path)
    config = json.loads((target / "config.json").read_text())
    (target / "config.json").write_text(text if text is not None else json.dumps({**config, **change}))
    return target


@pytest.mark.parametrize("change, text, message", [
    ({"hidden_size": "abc"}, None, "{file} has hidden_size='abc': a gemma config needs it as a positive integer"),
    ({"head_dim": 0}, None, "{file} has head_dim=0: a gemma config needs it as a positive integer"),
    (None, "[1, 2]", "{file} holds a JSON list, not an object of settings: copy it again"),
    (None, "{{not json", "cannot read {file} (Expecting property name enclosed in double quotes: line 1 column 2 "
                         "(char 1)): copy it again from the model's Hugging Face repo"),
    ({"quantization": {"bits": 4}}, None, "{file}: quantization has no group_size: write the group_size, bits"),
    ({"quantization": {"bits": 4, "group_size": 64, "mode": "int3"}}, None,
     "{file}: quantization mode 'int3' is not supported: use one of affine, mxfp4, nvfp4, mxfp8"),
])
def test_malformed_config_names_the_file_and_the_fix(tiny_dir, tmp_path, change, text, message):
    target = rewrite_config(tiny_dir, tmp_path, change, text and text.replace("{{", "{"))
    with pytest.raises(ModelLoadError) as err:
        mlx_gemma.load(target)
    assert message.format(file=target / "config.json") in str(err.value)


def test_config_without_a_required_size(tiny_dir, tmp_path):
    target = copy_model(tiny_dir, tmp_path)
    config = json.loads((target / "config.json").read_text())
    del config["hidden_size"]
    (target / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match=re.escape(f"{target / 'config.json'} has no hidden_size: a gemma config "
                                                       "needs it as a positive integer; copy config.json again")):
        mlx_gemma.load(target)


def test_config_that_is_a_directory(tiny_dir, tmp_path):
    target = copy_model(tiny_dir, tmp_path, ["config.json"])
    (target / "config.json").mkdir()
    with pytest.raises(ModelLoadError, match=re.escape(f"cannot read {target / 'config.json'} (Is a directory): "
                                                       "copy it again from the model's Hugging Face repo")):
        mlx_gemma.load(target)


def test_garbage_tokenizer_names_the_file(tiny_dir, tmp_path):
    target = copy_model(tiny_dir, tmp_path)
    (target / "tokenizer.json").write_text("garbage")
    with pytest.raises(ModelLoadError, match=re.escape(f"cannot read {target / 'tokenizer.json'} (")) as err:
        mlx_gemma.load(target)
    assert str(err.value).endswith("): copy it again from the model's Hugging Face repo")


def test_empty_model_name_is_refused():
    with pytest.raises(ModelLoadError, match=re.escape("model '' is empty: pass a model directory")):
        loading.resolve_model_dir("")


def no_hub(monkeypatch):
    def fake_snapshot_download(repo_id, **kwargs):
        raise AssertionError(f"{repo_id} must not be looked up on the Hub")
    monkeypatch.setattr("huggingface_hub.snapshot_download", fake_snapshot_download)


def test_a_missing_gguf_path_is_no_hub_id(monkeypatch):
    no_hub(monkeypatch)
    with pytest.raises(ModelLoadError, match=re.escape("no GGUF file at 'models/missing.gguf': check the path")):
        loading.resolve_model_dir("models/missing.gguf")


def fake_conversion(gguf_file, cache_root, key_version=None):
    """A converted directory as gguf.convert leaves it (config.json, source.json), without converting."""
    from mlx_gemma import gguf

    target = gguf.cache_dir_for(gguf_file, cache_root)
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}")
    (target / "source.json").write_text(json.dumps({"gguf": str(gguf_file.resolve())}))
    return target


def test_gguf_suffix_in_any_case(monkeypatch, tmp_path):
    no_hub(monkeypatch)
    monkeypatch.setenv("MLX_GEMMA_CACHE", str(tmp_path / "cache"))
    gguf_file = tmp_path / "model.GGUF"
    gguf_file.write_bytes(b"GGUF")
    target = fake_conversion(gguf_file, tmp_path / "cache" / "converted")
    assert loading.resolve_model_dir(gguf_file) == target


def test_gguf_cache_that_is_a_file(monkeypatch, tmp_path):
    (tmp_path / "cache").write_text("not a directory")
    monkeypatch.setenv("MLX_GEMMA_CACHE", str(tmp_path / "cache"))
    gguf_file = tmp_path / "model.gguf"
    gguf_file.write_bytes(b"GGUF")
    with pytest.raises(ModelLoadError) as err:
        loading.resolve_model_dir(gguf_file)
    assert str(err.value).startswith(f"cannot write the conversion of {gguf_file} under {tmp_path / 'cache' / 'converted'}")
    assert str(err.value).endswith("): set MLX_GEMMA_CACHE to a writable directory")


def test_other_conversions_of_the_same_gguf_are_removed(monkeypatch, tmp_path):
    from mlx_gemma import gguf

    root = tmp_path / "converted"
    gguf_file = tmp_path / "model.gguf"
    gguf_file.write_bytes(b"GGUF")
    monkeypatch.setattr(gguf, "CONVERTER_VERSION", "old")
    old = fake_conversion(gguf_file, root)
    other_file = tmp_path / "elsewhere" / "model.gguf"
    other_file.parent.mkdir()
    other_file.write_bytes(b"GGUF")
    other = fake_conversion(other_file, root)  # same stem, another file: kept
    not_ours = root / "model-0123456789abcdef"  # no source.json: not known to be ours
    not_ours.mkdir()
    unrelated = root / "notes"
    unrelated.mkdir()
    monkeypatch.setattr(gguf, "CONVERTER_VERSION", "new")
    current = fake_conversion(gguf_file, root)
    assert gguf.convert(gguf_file, root) == current
    assert sorted(p.name for p in root.iterdir()) == sorted([current.name, other.name, not_ours.name, "notes"])
    assert not old.exists()


def fake_hub_cache(tmp_path, files):
    """An HF cache holding a snapshot of google/gemma-2b-it with only `files`, as an interrupted download leaves."""
    repo = tmp_path / "hub" / "models--google--gemma-2b-it"
    snapshot = repo / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    for name in files:
        (snapshot / name).write_text("{}")
    return snapshot


def offline_python(tmp_path, code):
    import os
    import subprocess
    import sys

    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    env.pop("MLX_GEMMA_MODEL", None)
    return subprocess.run([sys.executable, "-c", f"import mlx_gemma\nfrom mlx_gemma import loading\n{code}"],
                          capture_output=True, text=True, timeout=120, env=env)


def test_a_partial_hub_snapshot_is_not_used(tmp_path):
    snapshot = fake_hub_cache(tmp_path, ["config.json"])
    done = offline_python(tmp_path, "print(loading.default_model()[0])\nloading.resolve_model_dir('google/gemma-2b-it')")
    assert done.stdout == "demo\n", done.stderr
    assert (f"ModelLoadError: the cached snapshot of google/gemma-2b-it at {snapshot} has no tokenizer.json or "
            "*.safetensors (an interrupted download?) and the rest cannot be downloaded: connect to the network "
            "(unset HF_HUB_OFFLINE), or pass a complete local directory with --model") in done.stderr


def test_a_complete_hub_snapshot_is_used_offline(tmp_path):
    snapshot = fake_hub_cache(tmp_path, ["config.json", "tokenizer.json", "model.safetensors"])
    done = offline_python(tmp_path, "print(loading.default_model()[0], loading.resolve_model_dir('google/gemma-2b-it'))")
    assert done.stdout == f"google/gemma-2b-it {snapshot}\n", done.stderr


def quantized_with_mlx_lm(tiny_dir, tmp_path, **options):
    from mlx_lm import convert

    convert(str(tiny_dir), mlx_path=str(tmp_path / "quantized"), quantize=True, **options)
    return tmp_path / "quantized"


def layer_schemes(model):
    import mlx.nn as nn

    return {path: (type(m).__name__, m.group_size, m.bits, m.mode) for path, m in model.named_modules()
            if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))}


@pytest.mark.parametrize("options, summary", [
    ({"q_mode": "mxfp4", "q_group_size": 32, "q_bits": 4}, {"group_size": 32, "bits": 4, "mode": "mxfp4"}),
    ({"quant_predicate": "mixed_3_6"}, {"group_size": 64, "bits": 4}),
])
def test_mlx_lm_quantized_checkpoints_load_as_mlx_lm_loads_them(tiny_dir, tmp_path, options, summary):
    from mlx.utils import tree_flatten
    from mlx_lm.utils import load_model as mlx_lm_load_model

    path = quantized_with_mlx_lm(tiny_dir, tmp_path, **options)
    runtime = mlx_gemma.load(path)
    reference, _ = mlx_lm_load_model(path)
    assert runtime.loaded.quantization == summary
    assert layer_schemes(runtime.model) == layer_schemes(reference) and layer_schemes(reference)
    ours, theirs = dict(tree_flatten(runtime.model.parameters())), dict(tree_flatten(reference.parameters()))
    assert ours.keys() == theirs.keys()
    assert all(mx.array_equal(ours[k], theirs[k]).item() for k in ours)
    assert runtime.generate(prompt="Hi", temperature=0, max_tokens=3).usage.completion_tokens >= 1


def test_mixed_quantization_keeps_each_layers_bits(tiny_dir, tmp_path):
    path = quantized_with_mlx_lm(tiny_dir, tmp_path, quant_predicate="mixed_3_6")
    runtime = mlx_gemma.load(path)
    bits = {scheme[2] for scheme in layer_schemes(runtime.model).values()}
    assert bits == {3, 6}


def test_quantizing_an_already_quantized_checkpoint_is_refused(tiny_dir, tmp_path):
    path = quantized_with_mlx_lm(tiny_dir, tmp_path)
    with pytest.raises(ModelLoadError, match=re.escape(
            "this checkpoint is already quantized (4-bit, by mlx-lm): drop --quantize 8 (quantize=), "
            "or start from the unquantized checkpoint")):
        load_model(path, quantize=8)


def shard(model_dir, tmp_path, keep=None):
    """The tiny model split over two indexed shards (as the Hub stores big models); only `keep` of them left."""
    from safetensors.numpy import load_file, save_file

    target = copy_model(model_dir, tmp_path, ["model.safetensors"])
    weights = load_file(model_dir / "model.safetensors")
    names = [f"model-0000{i}-of-00002.safetensors" for i in (1, 2)]
    halves = {name: {} for name in names}
    for i, key in enumerate(sorted(weights)):
        halves[names[i % 2]][key] = weights[key]
    for name in names if keep is None else keep:
        save_file(halves[name], str(target / name), metadata={"format": "pt"})
    weight_map = {key: name for name, half in halves.items() for key in half}
    (target / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return target


def test_a_sharded_checkpoint_loads_only_its_indexed_files(tiny_dir, tmp_path):
    target = shard(tiny_dir, tmp_path)
    mx.save_safetensors(str(target / "adapter.safetensors"), {"stray.weight": mx.zeros((2,))})  # not in the index
    reference = mlx_gemma.load(tiny_dir).logits([2, 5, 9])
    assert (mlx_gemma.load(target).logits([2, 5, 9]) == reference).all()


def test_a_missing_shard_is_named(tiny_dir, tmp_path):
    target = shard(tiny_dir, tmp_path, keep=["model-00001-of-00002.safetensors"])
    with pytest.raises(ModelLoadError, match=re.escape(
            f"{target} lacks model-00002-of-00002.safetensors, which model.safetensors.index.json lists "
            "(an interrupted download?): download the missing files again")):
        mlx_gemma.load(target)


def test_a_hub_snapshot_missing_a_shard_is_not_complete(monkeypatch, tiny_dir, tmp_path):
    import huggingface_hub
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no request to word the error
    target = shard(tiny_dir, tmp_path, keep=["model-00001-of-00002.safetensors"])
    assert loading._snapshot_lacks(target) == ["model-00002-of-00002.safetensors"]
    calls = []
    def fake_snapshot_download(repo_id, **kwargs):  # offline: the partial snapshot, both times
        calls.append(kwargs)
        return str(target)
    monkeypatch.setattr("huggingface_hub.snapshot_download", fake_snapshot_download)
    with pytest.raises(ModelLoadError, match=re.escape(
            f"the cached snapshot of google/gemma-2b-it at {target} has no model-00002-of-00002.safetensors")):
        loading.resolve_model_dir("google/gemma-2b-it")
    assert len(calls) == 2 and "*.safetensors.index.json" in calls[1]["allow_patterns"]


def test_an_old_partial_sharded_snapshot_without_its_index_is_not_complete(tiny_dir, tmp_path):
    """Snapshots fetched before the index was asked for: a shard named `-of-` says an index belongs."""
    target = shard(tiny_dir, tmp_path, keep=["model-00001-of-00002.safetensors"])
    (target / "model.safetensors.index.json").unlink()
    assert loading._snapshot_lacks(target, shards_need_index=True) == ["model.safetensors.index.json"]


def test_a_sharded_repo_without_an_index_is_complete_once_downloaded(monkeypatch, tiny_dir, tmp_path):
    """The index is asked of the cache only: after a download, a repo that has none loads every shard."""
    target = shard(tiny_dir, tmp_path)
    (target / "model.safetensors.index.json").unlink()
    calls = []
    monkeypatch.setattr("huggingface_hub.snapshot_download", lambda repo_id, **kwargs: calls.append(kwargs) or
                        str(target))
    assert loading.resolve_model_dir("google/gemma-2b-it") == target
    assert [c.get("local_files_only", False) for c in calls] == [True, False]


@pytest.mark.parametrize("method", ["bitsandbytes", "gptq", "awq", "fp8"])
def test_foreign_quantized_checkpoints_are_refused(tiny_dir, tmp_path, method):
    target = rewrite_config(tiny_dir, tmp_path, {"quantization_config": {"quant_method": method, "bits": 4}})
    with pytest.raises(ModelLoadError, match=re.escape(
            f"{target / 'config.json'} describes weights quantized with quant_method {method!r}, which mlx-gemma "
            "cannot read: use the unquantized checkpoint (quantize= or --quantize 4 or 8 quantizes it at load) "
            "or one quantized for MLX by mlx-lm (mlx_lm.convert -q)")):
        mlx_gemma.load(target)


def test_an_embedding_model_is_refused(tiny_dir, tmp_path):
    target = rewrite_config(tiny_dir, tmp_path, {"use_bidirectional_attention": True})
    with pytest.raises(ModelLoadError, match=re.escape(
            f"{target / 'config.json'} has use_bidirectional_attention=true: this is an embedding model "
            "(such as EmbeddingGemma), not a text generator")):
        mlx_gemma.load(target)


@pytest.mark.parametrize("cut", [0.5, 0.001])
def test_a_truncated_safetensors_file_is_named(tiny_dir, tmp_path, cut):
    target = copy_model(tiny_dir, tmp_path)
    data = (target / "model.safetensors").read_bytes()
    (target / "model.safetensors").write_bytes(data[:max(1, int(len(data) * cut))])
    with pytest.raises(ModelLoadError, match=re.escape(
            f"cannot read {target / 'model.safetensors'} (")) as err:
        mlx_gemma.load(target)
    assert str(err.value).endswith("): the file is truncated or corrupt (an interrupted download?): "
                                   "download it again")


@pytest.mark.parametrize("repo_files, says", [
    (["config.json", "model.gguf", "README.md"], "; the repo holds GGUF files: download one and pass its path as --model"),
    (["config.json", "tokenizer.json", "pytorch_model.bin"],
     "; the repo holds pickled *.bin weights: convert them to safetensors"),
    (["config.json"], ""),
])
def test_a_hub_repo_without_safetensors_says_so_when_online(monkeypatch, tmp_path, repo_files, says):
    """Online, a complete download without weights is the repo's doing, not an interrupted download."""
    import huggingface_hub
    snapshot = tmp_path / "snapshot"
    snapshot.mkdir()
    (snapshot / "config.json").write_text("{}")
    monkeypatch.setattr("huggingface_hub.snapshot_download", lambda repo_id, **kwargs: str(snapshot))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    info = types.SimpleNamespace(siblings=[types.SimpleNamespace(rfilename=name) for name in repo_files])
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", lambda self, repo_id, timeout: info)
    with pytest.raises(ModelLoadError) as refused:
        loading.resolve_model_dir("someone/gemma-gguf")
    assert str(refused.value) == ("someone/gemma-gguf has no tokenizer.json or *.safetensors: a model here is "
                                  "config.json, tokenizer.json and *.safetensors weights" + says)
