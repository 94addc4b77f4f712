"""Read and validate LoRA adapter files (PEFT or mlx-lm) into one in-memory layout.

Contract: `read_adapter(path, base)` returns an `Adapter` whose `modules` map a base linear's
path ("model.layers.3.self_attn.q_proj") to `LoRAWeights(a, b)` with `a` (in, r) and `b`
(r, out), the scale already folded into `b`, so that the adapted layer computes
`y = W x + x @ a @ b`. Or it raises `AdapterError`, whose message lists every problem found.

- PEFT: `adapter_config.json` + `adapter_model.safetensors`; keys like
  `base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight`, `lora_A` (r, in),
  `lora_B` (out, r); scale `lora_alpha / r`, or `lora_alpha / sqrt(r)` with `use_rslora`; `r`
  and `lora_alpha` per module from `rank_pattern` / `alpha_pattern` as PEFT matches them;
  every tensor must belong to a module that `target_modules` (list or regex) and
  `layers_to_transform` select.
- mlx-lm: `adapter_config.json` with `lora_parameters: {rank, scale}` + `adapters.safetensors`
  with `...q_proj.lora_a` (in, r) and `lora_b` (r, out); scale as stored.
Refused, each with its reason: PEFT features that change the math beyond `W x + s B A x`
(DoRA, `modules_to_save`, `bias` other than "none", aLoRA, layer replication and the other
fields of `_REFUSED_PEFT_FIELDS`; PiSSA, CorDA, OLoRA, LoftQ and LoRA-GA initialisations,
which change the base weights), config values of the wrong type or range (named, before any
weight is read), two adapter names' tensors for one layer, an mlx-lm config without
`lora_parameters.scale` (as mlx-lm itself), other PEFT types, pickled `.bin` weights, unknown modules, mismatched shapes, rank over the limit (default 32), files over
the size limit (default 300 MB), non-finite weights, an adapter `model_type` of another family
than the base.

`check_adapter_files(path, base)` validates whatever PEFT files a directory holds so far (an
upload may bring one file at a time): each present file is checked alone first, the config
against the base's family and the safetensors header parsed without loading a tensor (dtypes
F16/BF16/F32, 2-D LoRA A/B weights whose declared shapes match their bytes, offsets tiling the
data exactly); then, with both files and a base, `read_adapter` loads and checks the weights.
Without a base, a config's model_type must be a family served here, and with both files each
tensor's rank must be the config's `r` (or its `rank_pattern` entry). An error shows its first
MAX_PROBLEMS_SHOWN problems (`problems` holds them all).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx

PEFT_WEIGHTS = "adapter_model.safetensors"
MLX_LM_WEIGHTS = "adapters.safetensors"
CONFIG = "adapter_config.json"
PEFT_PREFIX = "base_model.model."
FAMILIES = {"gemma": "gemma", "gemma3": "gemma3", "gemma3_text": "gemma3"}
_SAFETENSORS_DTYPES = {"F16": 2, "BF16": 2, "F32": 4}  # dtype -> bytes per element
_MAX_HEADER_BYTES = 100 * 1000 * 1000


class AdapterError(ValueError):
    """An adapter cannot be served faithfully; `problems` lists every reason."""

    def __init__(self, path: str | Path, problems: list[str]):
        self.problems = list(dict.fromkeys(problems))  # each once, in order: a limit may be hit by every module
        super().__init__(f"adapter {str(path)!r} refused: {self.summary}")

    @property
    def summary(self) -> str:
        """The problems joined, the first MAX_PROBLEMS_SHOWN of them: an adapter for another model fails
        every module alike."""
        more = len(self.problems) - MAX_PROBLEMS_SHOWN
        return "; ".join(self.problems[:MAX_PROBLEMS_SHOWN]) + (f"; and {more} more like these" if more > 0 else "")


MAX_PROBLEMS_SHOWN = 8


SHAPE_MISMATCH = "do not fit the base layer"  # the weights' shapes against the config's rank and the base
_RAISE_SIZE = " (a server raises it with --max-upload-mb)"


@dataclass(frozen=True)
class AdapterLimits:
    max_rank: int = 32
    max_file_bytes: int = 300 * 1024 * 1024


@dataclass(frozen=True)
class BaseInfo:
    """What an adapter is validated against: the base's family and its linears' (in, out)."""

    family: str
    linears: Mapping[str, tuple[int, int]]


@dataclass(frozen=True)
class LoRAWeights:
    a: mx.array  # (in, r)
    b: mx.array  # (r, out), scale folded in
    scale: float

    @property
    def rank(self) -> int:
        return self.a.shape[1]


@dataclass
class Adapter:
    name: str
    path: Path
    format: str  # "peft" or "mlx-lm"
    modules: dict[str, LoRAWeights]
    content_hash: str
    config: dict[str, Any] = field(repr=False)

    @property
    def max_rank(self) -> int:
        return max(w.rank for w in self.modules.values())

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "path": str(self.path), "format": self.format, "rank": self.max_rank,
                "modules": len(self.modules), "hash": self.content_hash}


def read_adapter(path: str | Path, base: BaseInfo, name: str | None = None,
                 limits: AdapterLimits = AdapterLimits()) -> Adapter:
    path = Path(path).expanduser()
    problems: list[str] = []
    config_bytes, weights_file = _read_files(path, limits, problems)
    config = _parse_config(config_bytes, problems)
    if config is None or weights_file is None:
        raise AdapterError(path, problems)
    fmt = "peft" if weights_file.name == PEFT_WEIGHTS else "mlx-lm"
    _check_config(config, fmt, base.family, problems)
    if problems:  # the module math below reads the config's values
        raise AdapterError(path, problems)
    # Each file is read once: the hash (the prefix cache's key) is of exactly the bytes loaded,
    # even when a re-upload replaces a file while this runs.
    weights_bytes = weights_file.read_bytes()
    tensors = _load_tensors(weights_bytes, weights_file.name, problems)
    modules = (_peft_modules if fmt == "peft" else _mlx_lm_modules)(config, tensors, base, limits, problems)
    if problems or not modules:
        raise AdapterError(path, problems or ["the weights file holds no LoRA tensors"])
    return Adapter(name or path.name, path, fmt, modules, _content_hash(config_bytes, weights_bytes), config)


def check_adapter_files(path: str | Path, base: BaseInfo | None = None,
                        limits: AdapterLimits = AdapterLimits()) -> None:
    """Validate whatever PEFT files a directory holds (one or both); raise AdapterError listing the problems.

    Each present file is checked alone: the config against the base's family (none without a
    base), the weights by their safetensors header only, without loading a tensor, so a hostile
    header never reaches the loader. Then, with both files and a base, `read_adapter(path, base)`.
    """
    path = Path(path).expanduser()
    config_file, weights_file = path / CONFIG, path / PEFT_WEIGHTS
    if not config_file.is_file() and not weights_file.is_file():
        where = "in the adapter directory" if path.is_dir() else f"at {str(path)!r}: no such directory"
        raise AdapterError(path, [f"neither {CONFIG} nor {PEFT_WEIGHTS} {where}"])
    problems: list[str] = []
    config = header = None
    if config_file.is_file() and _within_limit(config_file, limits, problems):
        config = _check_config_alone(config_file, base, problems)
    if weights_file.is_file() and _within_limit(weights_file, limits, problems):
        header = _check_safetensors_header(weights_file, problems)
    if not problems and base is None and config is not None and header is not None:
        _check_ranks_in_header(config, header, problems, limits.max_rank)
    if problems:
        raise AdapterError(path, problems)
    if base is not None and config_file.is_file() and weights_file.is_file():
        read_adapter(path, base, limits=limits)


def _check_ranks_in_header(config: dict, header: dict, problems: list[str], max_rank: int) -> None:
    """Without a base, each tensor's rank side (lora_A rows, lora_B columns) against the config's r
    and rank_pattern, and the highest against the limit, from the (valid) header alone."""
    mismatched, highest = [], 0
    for key, info in header.items():
        module, side = _split_peft_key(key)  # the header passed its checks: every key is a LoRA A/B weight
        rank = _pattern_value(config.get("rank_pattern"), module, config.get("r", 8))
        found = info["shape"][0 if side == "A" else 1]
        highest = max(highest, found)
        if found != rank:
            mismatched.append(f"{module}: lora_{side} has rank {found} where {CONFIG} says r={rank}: "
                              f"{SHAPE_MISMATCH}; upload the config saved with these weights")
    problems += ([_over_rank_limit(highest, max_rank)] if highest > max_rank else []) + mismatched


def _over_rank_limit(rank: int, max_rank: int) -> str:
    return (f"rank {rank} is over the limit of {max_rank}: train with r <= {max_rank} (Workers AI's limit is 32), "
            "or raise the limit (--max-adapter-rank of mlx-gemma serve, generate, fuse and finetune create; "
            "max_adapter_rank= in Python)")


def _within_limit(file: Path, limits: AdapterLimits, problems: list[str]) -> bool:
    size = file.stat().st_size
    if size > limits.max_file_bytes:
        problems.append(f"{file.name} is {size} bytes, over the limit of {limits.max_file_bytes}{_RAISE_SIZE}")
    return size <= limits.max_file_bytes


def _check_config_alone(file: Path, base: BaseInfo | None, problems: list[str]) -> dict | None:
    config = _read_config(file, problems)
    if config is not None:
        # Without a base, the config's own family, which must be a Gemma one.
        model_type = config.get("model_type")
        if base is None and isinstance(model_type, str) and model_type not in FAMILIES:
            problems.append(f"model_type {model_type!r} is not a model family served here: adapters trained on "
                            f"{', '.join(sorted(FAMILIES))} are")
        own_family = FAMILIES.get(model_type) if isinstance(model_type, str) else None
        _check_config(config, "peft", base.family if base is not None else own_family, problems)
    return config


def _check_safetensors_header(file: Path, problems: list[str]) -> dict | None:
    """The header's tensor entries, checked; None when it cannot be read."""
    parsed = _read_safetensors_header(file, problems)
    if parsed is None:
        return None
    header, data_bytes = parsed
    if not isinstance(header.pop("__metadata__", {}), dict):
        problems.append(f"{file.name}: __metadata__ must be a JSON object")
    if not header:
        problems.append(f"{file.name} holds no LoRA tensors")
    spans = _tensor_spans(file.name, header, problems)
    if spans is not None and not _tiles(sorted(spans), data_bytes):
        problems.append(f"{file.name}: tensor data_offsets do not tile the {data_bytes} data bytes exactly")
    return header


def _tensor_spans(file_name: str, header: dict, problems: list[str]) -> list[tuple[int, int]] | None:
    """Each tensor's [begin, end) in the data section, or None if any entry is malformed."""
    spans = []
    for key, info in header.items():
        if _split_peft_key(key) is None:
            problems.append(f"tensor {key!r} is not a LoRA A/B weight (keys end in lora_A.weight or lora_B.weight)")
        problem = _tensor_entry_problem(info)
        if problem:
            problems.append(f"{file_name}: tensor {key!r} {problem}")
        else:
            spans.append((info["data_offsets"][0], info["data_offsets"][1]))
    return spans if len(spans) == len(header) else None


def _read_safetensors_header(file: Path, problems: list[str]) -> tuple[dict, int] | None:
    """The header object and the size of the data that follows it, or None with a problem noted."""
    size = file.stat().st_size
    with file.open("rb") as handle:
        prefix = handle.read(8)
        length = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
        if not 0 < length <= min(_MAX_HEADER_BYTES, size - 8):
            problems.append(f"{file.name} is not a valid safetensors file (header length {length} "
                            f"in a file of {size} bytes; at most {_MAX_HEADER_BYTES} and the file size - 8)")
            return None
        raw = handle.read(length)
    try:
        header = json.loads(raw.decode("utf-8"))
    except ValueError as exc:  # UnicodeDecodeError is a ValueError
        problems.append(f"{file.name} is not a valid safetensors file (header is not UTF-8 JSON: {exc})")
        return None
    if not isinstance(header, dict):
        problems.append(f"{file.name} is not a valid safetensors file (header is not a JSON object)")
        return None
    return header, size - 8 - length


def _tensor_entry_problem(info: Any) -> str | None:
    if not isinstance(info, dict):
        return "must be described by a JSON object"
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if dtype not in _SAFETENSORS_DTYPES:
        return f"has dtype {dtype!r}: only {', '.join(_SAFETENSORS_DTYPES)} are served"
    if not (isinstance(shape, list) and len(shape) == 2 and all(_is_count(d) for d in shape)):
        return f"has shape {shape!r}: a LoRA weight is a 2-D list of sizes"
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)):
        return f"has data_offsets {offsets!r}: expected [begin, end]"
    expected = math.prod(shape) * _SAFETENSORS_DTYPES[dtype]
    if offsets[1] - offsets[0] != expected:
        return (f"has data_offsets {offsets!r} spanning {offsets[1] - offsets[0]} bytes, "
                f"not the {expected} its shape needs")
    return None


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _tiles(spans: list[tuple[int, int]], total: int) -> bool:
    """Sorted [begin, end) spans cover [0, total) with no gap or overlap, as safetensors requires."""
    position = 0
    for begin, end in spans:
        if begin != position:
            return False
        position = end
    return position == total


def _read_files(path: Path, limits: AdapterLimits, problems: list[str]) -> tuple[bytes | None, Path | None]:
    """The config's bytes (None when missing) and the weights file present, checked against the size limit."""
    if not path.is_dir():
        problems.append(f"no adapter directory at {str(path)!r}")
        return None, None
    config = (path / CONFIG).read_bytes() if (path / CONFIG).is_file() else None
    weights_file = next((path / n for n in (PEFT_WEIGHTS, MLX_LM_WEIGHTS) if (path / n).is_file()), None)
    if weights_file is None:
        pickled = (path / "adapter_model.bin").exists()
        problems.append("pickled adapter_model.bin weights are refused: save with safetensors "
                        "(PEFT's save_pretrained does by default)" if pickled else
                        f"no {PEFT_WEIGHTS} (PEFT) or {MLX_LM_WEIGHTS} (mlx-lm) in the adapter directory")
    for file in (path / CONFIG, weights_file):
        if file is not None and file.is_file() and file.stat().st_size > limits.max_file_bytes:
            problems.append(f"{file.name} is {file.stat().st_size} bytes, over the limit of "
                            f"{limits.max_file_bytes}{_RAISE_SIZE}")
    return config, weights_file


def _read_config(file: Path, problems: list[str]) -> dict | None:
    return _parse_config(file.read_bytes() if file.is_file() else None, problems)


def _parse_config(raw: bytes | None, problems: list[str]) -> dict | None:
    if raw is None:
        problems.append(f"no {CONFIG} in the adapter directory")
        return None
    try:
        config = json.loads(raw.decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        problems.append(f"{CONFIG} is not valid JSON ({exc})")
        return None
    if not isinstance(config, dict):
        problems.append(f"{CONFIG} must hold a JSON object")
        return None
    return config


# PEFT config fields that change what the adapter computes beyond `W x + s B A x`, when set.
_REFUSED_PEFT_FIELDS = {
    "use_dora": "DoRA adapters are not served (train with use_dora=False)",
    "modules_to_save": "only LoRA weights can be applied, not whole trained modules",
    "trainable_token_indices": "trained embedding rows are not served",
    "lora_bias": "a bias on lora_B is not served (train with lora_bias=False)",
    "alora_invocation_tokens": "activated LoRA (aLoRA) applies only after its invocation tokens, which is not served",
    "layer_replication": "replicated base layers are not served",
    "target_parameters": "LoRA on raw parameters (not linear layers) is not served",
    "use_qalora": "QA-LoRA is not served",
    "use_bdlora": "block-diagonal LoRA is not served",
    "arrow_config": "Arrow routing between adapters is not served",
    "kasa_config": "KaSA adapters are not served",
    "monteclora_config": "MonteCLoRA adapters are not served",
}
# init_lora_weights values with which PEFT changes the base weights, so W + s B A is not the trained model.
_BASE_CHANGING_INITS = ("pissa", "corda", "olora", "loftq", "lora_ga")


def _check_config(config: dict, fmt: str, family: str, problems: list[str]) -> None:
    model_type = config.get("model_type")
    if model_type is not None and not isinstance(model_type, str):
        problems.append(f"model_type {model_type!r} is refused: give a string such as 'gemma'")
    elif model_type is not None and FAMILIES.get(model_type) != family:
        problems.append(f"model_type {model_type!r} is not this base's family ({family})")
    if fmt == "mlx-lm":
        _check_mlx_lm_config(config, problems)
        return
    if config.get("peft_type", "LORA") != "LORA":
        problems.append(f"peft_type {config.get('peft_type')!r} is not served: only LORA adapters are")
    for name, reason in _REFUSED_PEFT_FIELDS.items():
        if config.get(name) not in (None, False, [], {}, ""):
            problems.append(f"{name} {config[name]!r} is refused: {reason}")
    if config.get("bias", "none") != "none":
        problems.append(f"bias {config.get('bias')!r} is not served: train with bias='none'")
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
        problems.append(f"init_lora_weights {init!r} is refused: it changes the base weights, so the adapter "
                        "alone is not the trained model; save it with PEFT's save_pretrained(..., "
                        "path_initial_model_for_weight_conversion=...) to convert it to plain LoRA")
    _check_peft_values(config, problems)


def _check_peft_values(config: dict, problems: list[str]) -> None:
    """The types and ranges of the fields the math reads, so a bad value is named, not a crash later."""
    if "r" in config and not _is_rank(config["r"]):
        problems.append(f"r {config['r']!r} is refused: the rank must be a whole number >= 1")
    if "lora_alpha" in config and not _is_finite_number(config["lora_alpha"]):
        problems.append(f"lora_alpha {config['lora_alpha']!r} is refused: give a finite number")
    if not isinstance(config.get("use_rslora", False), bool):
        problems.append(f"use_rslora {config['use_rslora']!r} is refused: give true or false")
    _check_patterns(config, "rank_pattern", _is_rank, "whole numbers >= 1", problems)
    _check_patterns(config, "alpha_pattern", _is_finite_number, "finite numbers", problems)
    targets = config.get("target_modules")
    if not (targets is None or isinstance(targets, str) and _compiles(targets) or _is_str_list(targets, _is_str)):
        problems.append(f"target_modules {targets!r} is refused: give a list of module names or one regular expression")
    layers = config.get("layers_to_transform")
    if not (layers is None or _is_count(layers) or isinstance(layers, list) and all(_is_count(i) for i in layers)):
        problems.append(f"layers_to_transform {layers!r} is refused: give a layer index or a list of them")
    pattern = config.get("layers_pattern")
    if not (pattern is None or isinstance(pattern, str) and _compiles(pattern) or _is_str_list(pattern, _compiles)):
        problems.append(f"layers_pattern {pattern!r} is refused: give a regular expression or a list of them")


def _check_patterns(config: dict, field_name: str, valid: Any, wanted: str, problems: list[str]) -> None:
    patterns = config.get(field_name)
    if patterns is None:
        return
    if not isinstance(patterns, dict):
        problems.append(f"{field_name} {patterns!r} is refused: give an object of module pattern -> value")
        return
    bad = {k: v for k, v in patterns.items() if not (_compiles(k) and valid(v))}
    if bad:
        problems.append(f"{field_name} entries {bad!r} are refused: keys must be regular expressions, values {wanted}")


def _check_mlx_lm_config(config: dict, problems: list[str]) -> None:
    kind = config.get("fine_tune_type", "dora" if config.get("use_dora") else "lora")
    if kind != "lora":
        problems.append(f"fine_tune_type {kind!r} is not served: only LoRA adapters are")
    params = config.get("lora_parameters")
    if not isinstance(params, dict):
        problems.append(f"lora_parameters {params!r} is refused: mlx-lm writes an object with rank and scale")
        return
    if "scale" not in params:
        hint = " (mlx-lm's scale plays the part of alpha / rank; it reads no 'alpha')" if "alpha" in params else ""
        problems.append(f"lora_parameters has no 'scale'{hint}: add the scale the adapter was trained with")
    elif not _is_finite_number(params["scale"]):
        problems.append(f"lora_parameters.scale {params['scale']!r} is refused: give a finite number")
    if "rank" in params and not _is_rank(params["rank"]):
        problems.append(f"lora_parameters.rank {params['rank']!r} is refused: give a whole number >= 1")


def _is_rank(value: Any) -> bool:
    return _is_count(value) and value >= 1


def _is_finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_str_list(value: Any, valid: Callable[[str], bool]) -> bool:
    """A list of strings that pass `valid`: target_modules names are matched literally, layers_pattern
    entries as regular expressions."""
    return isinstance(value, list) and all(isinstance(item, str) and valid(item) for item in value)


def _is_str(value: str) -> bool:
    return True


def _compiles(pattern: str) -> bool:
    try:
        re.compile(pattern)
    except re.error:
        return False
    return True


def _load_tensors(data: bytes, file_name: str, problems: list[str]) -> dict[str, mx.array]:
    try:
        return mx.load(io.BytesIO(data), format="safetensors")
    except Exception as exc:  # mlx raises plain RuntimeError/ValueError for corrupt files
        problems.append(f"{file_name} is not a valid safetensors file ({exc})")
        return {}


def _content_hash(*contents: bytes) -> str:
    digest = hashlib.sha256()
    for content in contents:
        digest.update(content)
    return digest.hexdigest()[:16]


def _pattern_value(patterns: Mapping[str, Any], module: str, default: Any) -> Any:
    """PEFT's rule: the first pattern p such that the module path matches (.*\\.)?(p)$."""
    for pattern, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


def _peft_targets(config: dict, module: str) -> bool:
    targets = config.get("target_modules")
    if isinstance(targets, str):
        return re.fullmatch(targets, module) is not None
    targets = list(targets or [])
    if module in targets:
        return True  # as PEFT: a module named in full is adapted whatever layers_to_transform says
    return any(module.endswith(f".{t}") for t in targets) and _in_layers(config, module)


def _in_layers(config: dict, module: str) -> bool:
    layers = config.get("layers_to_transform")
    if layers is None or layers == []:
        return True
    patterns = config.get("layers_pattern") or [r"[^.]*"]
    patterns = [patterns] if isinstance(patterns, str) else patterns
    for pattern in patterns:
        match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", module)
        if match:
            index = int(match["idx"])
            return index == layers if isinstance(layers, int) else index in layers
    return False


def _split_peft_key(key: str) -> tuple[str, str] | None:
    match = re.fullmatch(r"(.+)\.lora_(A|B)(?:\.[^.]+)?\.weight", key.removeprefix(PEFT_PREFIX))
    return (match[1], match[2]) if match else None


def _pair_tensors(tensors: dict[str, mx.array], split: Any, problems: list[str]) -> dict[str, dict[str, mx.array]]:
    pairs: dict[str, dict[str, mx.array]] = {}
    keys: dict[tuple[str, str], str] = {}
    for key, value in tensors.items():
        parts = split(key)
        if parts is None:
            problems.append(f"tensor {key!r} is not a LoRA A/B weight")
            continue
        if parts in keys:  # two adapter names (lora_B.default and lora_B.other) for one layer
            problems.append(f"tensors {keys[parts]!r} and {key!r} are both lora_{parts[1]} of {parts[0]}: "
                            "save one adapter per directory")
            continue
        keys[parts] = key
        pairs.setdefault(parts[0], {})[parts[1]] = value
    return pairs


def _peft_modules(config: dict, tensors: dict[str, mx.array], base: BaseInfo, limits: AdapterLimits,
                  problems: list[str]) -> dict[str, LoRAWeights]:
    modules = {}
    for module, pair in _pair_tensors(tensors, _split_peft_key, problems).items():
        if not _known_module(module, pair, base, problems):
            continue
        if not _peft_targets(config, module):
            problems.append(f"{module} has weights but target_modules/layers_to_transform do not select it")
            continue
        rank = int(_pattern_value(config.get("rank_pattern"), module, config.get("r", 8)))
        alpha = float(_pattern_value(config.get("alpha_pattern"), module, config.get("lora_alpha", 8)))
        scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
        weights = _checked(module, pair["A"].T, pair["B"].T, rank, scale, base, limits, problems)
        if weights is not None:
            modules[module] = weights
    return modules


def _mlx_lm_modules(config: dict, tensors: dict[str, mx.array], base: BaseInfo, limits: AdapterLimits,
                    problems: list[str]) -> dict[str, LoRAWeights]:
    scale = float(config["lora_parameters"]["scale"])

    def split(key: str) -> tuple[str, str] | None:
        match = re.fullmatch(r"(.+)\.lora_(a|b)", key)
        return (match[1], match[2].upper()) if match else None

    modules = {}
    for module, pair in _pair_tensors(tensors, split, problems).items():
        if _known_module(module, pair, base, problems):
            rank = pair["A"].shape[-1] if pair["A"].ndim == 2 else -1
            weights = _checked(module, pair["A"], pair["B"], rank, scale, base, limits, problems)
            if weights is not None:
                modules[module] = weights
    return modules


def _known_module(module: str, pair: dict[str, mx.array], base: BaseInfo, problems: list[str]) -> bool:
    if module not in base.linears:
        problems.append(f"unknown module {module!r}: the base model has no linear layer of that name")
        return False
    if set(pair) != {"A", "B"}:
        problems.append(f"{module} has lora_{'B' if 'A' in pair else 'A'} missing")
        return False
    return True


def _checked(module: str, a: mx.array, b: mx.array, rank: int, scale: float, base: BaseInfo,
             limits: AdapterLimits, problems: list[str]) -> LoRAWeights | None:
    """a is (in, r), b is (r, out) here; check them against the base layer and the limits."""
    n_in, n_out = base.linears[module]
    if a.shape != (n_in, rank) or b.shape != (rank, n_out):
        problems.append(f"{module}: shapes A {tuple(a.T.shape)} and B {tuple(b.T.shape)} {SHAPE_MISMATCH} "
                        f"({n_out} x {n_in}) at rank {rank}")
        return None
    if rank > limits.max_rank:
        problems.append(_over_rank_limit(rank, limits.max_rank))
        return None
    a32, b32 = a.astype(mx.float32), b.astype(mx.float32) * scale
    if not (mx.all(mx.isfinite(a32)) and mx.all(mx.isfinite(b32))).item():
        problems.append(f"{module}: weights hold NaN or infinite values")
        return None
    return LoRAWeights(a32, b32, scale)
