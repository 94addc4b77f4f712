"""mlx-gemma: Gemma on MLX with per-request LoRA, served on the Workers AI API.

    import mlx_gemma
    rt = mlx_gemma.load("google/gemma-2b-it")
    print(rt.generate(prompt="Why is the sky blue?", max_tokens=64).text)

Importing this package before `mlx` lets it preload OpenBLAS on Linux (see _platform).
"""

from __future__ import annotations

from . import _platform

_platform.preload_openblas()

from pathlib import Path  # noqa: E402

from .engine import QueueFullError  # noqa: E402
from .loading import ModelLoadError, load_model  # noqa: E402
from .lora.adapters import AdapterLimits  # noqa: E402
from .lora.store import AdapterBusyError  # noqa: E402
from .runtime import GenerationResult, Runtime, TextStream, Usage, check_capacities, check_fuse  # noqa: E402
from .sampler import GenerationParams  # noqa: E402

__all__ = ["load", "Runtime", "GenerationParams", "GenerationResult", "TextStream", "Usage", "ModelLoadError",
           "QueueFullError", "AdapterBusyError"]
__version__ = "0.1.0"


def load(model: str | Path, adapters: dict[str, str] | None = None, dtype: str | None = None,
         quantize: int | None = None, fuse: str | None = None, max_resident_adapters: int = 8,
         max_queue: int = 64, max_batch: int = 8, max_adapter_rank: int = 32) -> Runtime:
    """Load a model (a local directory or a Hugging Face id) and return a Runtime.

    adapters: {name: directory} of LoRA adapters (PEFT or mlx-lm files), each usable per call
    with `lora=name`. fuse: the name of one of them to merge into the weights instead.
    dtype: float32, float16 or bfloat16 (default: float32 on Linux, the checkpoint's on macOS).
    quantize: 4 or 8 to quantize the weights with MLX after loading.
    max_resident_adapters: adapters kept in memory at once (others reload on demand).
    max_queue: requests that may wait for the engine before new ones are refused.
    max_batch: requests the engine decodes together.
    max_adapter_rank: the largest LoRA rank an adapter may have (Cloudflare's limit is 32).
    A bad capacity (below 1) raises ValueError before the model loads; a bad adapter raises
    before the engine thread starts (see Runtime), so a failed load leaves no thread behind.
    """
    adapters = dict(adapters or {})
    check_capacities(max_resident_adapters=max_resident_adapters, max_queue=max_queue, max_batch=max_batch)
    check_fuse(adapters, fuse)  # both before the model loads
    return Runtime(load_model(model, dtype=dtype, quantize=quantize), max_resident_adapters, max_queue, max_batch,
                   AdapterLimits(max_rank=max_adapter_rank), adapters=adapters, fuse=fuse)
