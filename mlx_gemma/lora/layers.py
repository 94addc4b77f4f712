"""LoRALinear: a shared base linear plus the resident adapters, chosen per batch row.

Contract:
- `install(model, adapter, slot)` wraps each linear the adapter targets in a `LoRALinear`
  (once; the base weight object is shared, never copied) and registers the adapter's (a, b)
  under `slot` (a positive int). `uninstall(model, slot)` removes it; a layer left without
  adapters is unwrapped, so a model with no adapters runs exactly the base code.
- Before a forward pass, `set_rows(model, slots)` says which slot each batch row uses (0 = the
  base alone). One slot for the whole batch computes `x @ a @ b` with that adapter's own rank;
  different slots gather from the adapters stacked and zero-padded to the largest rank, so rows
  with different adapters share one forward pass. On a plain float linear the delta is added
  inside the base product (`addmm`); a batch of rows is folded into one matrix first when the
  weight is large enough that reading it once per row would cost more (ADDMM_BATCH_BYTES).
  Each layer picks among base, one adapter and mixed rows once per change of rows (the
  context's `version`) or of its adapters, and keeps the chosen function for the calls after.
- `fuse(model, adapter)` merges an adapter into the weights in float32 (zero serving
  overhead). A quantized base layer is dequantized and stays unquantized: the function returns
  how many layers that was, so callers can say so; the delta is never dropped or silently
  requantized.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from .adapters import Adapter, LoRAWeights


class LoRAContext:
    """The adapter slot of each batch row, shared by all LoRALinear layers of one model."""

    def __init__(self) -> None:
        self.single: int = 0  # every row on this slot (0 = no adapter)
        self.rows: mx.array | None = None  # per-row slots when they differ
        self.batch: mx.array | None = None  # 0..B-1, the row each output comes from
        self.version = 0  # changes with the rows: layers rebuild their call plan when it does
        self._within: dict[int, mx.array] = {}
        self._slots: tuple[int, ...] = ()

    def set(self, slots: Sequence[int]) -> None:
        if tuple(slots) == self._slots:
            return  # the same rows as the last step: keep the index arrays and call plans already built
        self._slots, self._within, self.version = tuple(slots), {}, self.version + 1
        if len(set(slots)) <= 1:
            self.single, self.rows, self.batch = (slots[0] if slots else 0), None, None
        else:
            self.single, self.rows = -1, mx.array(list(slots), dtype=mx.int32)
            self.batch = mx.arange(len(slots), dtype=mx.uint32)

    def rows_within(self, n_slots: int) -> mx.array:
        """Each row's slot, or 0 (a zero adapter) where a layer's stack has no such slot; cached per step."""
        if n_slots not in self._within:
            rows = self.rows
            self._within[n_slots] = (mx.minimum(rows, n_slots - 1) * (rows < n_slots)).astype(mx.uint32)
        return self._within[n_slots]


class _Mixed:
    """What one layer needs to decode rows with different adapters, built once per change of rows."""

    __slots__ = ("for_rows", "a", "b", "rows", "batch")

    def __init__(self, context: LoRAContext, stacked: tuple[mx.array, mx.array]):
        self.for_rows, self.batch = context.rows, context.batch
        self.a, self.b = stacked
        self.rows = context.rows_within(self.a.shape[0])

    def delta(self, x: mx.array) -> mx.array:
        """Each row's x @ a @ b, with its own adapter; in the stacks' dtype (float32 where x's is one
        that `gather_mm` cannot take: see `_gather_dtype`), returned in x's."""
        cast = x.dtype != self.a.dtype
        h = mx.gather_mm(x.astype(self.a.dtype) if cast else x, self.a, lhs_indices=self.batch, rhs_indices=self.rows)
        if cast:  # rounded as the one-adapter path's x @ a is, so a row's tokens are the same alone or batched
            h = h.astype(x.dtype).astype(self.a.dtype)
        delta = mx.gather_mm(h, self.b, lhs_indices=self.batch, rhs_indices=self.rows)
        return delta.astype(x.dtype) if cast else delta


def _gather_dtype(dtype: mx.Dtype) -> mx.Dtype:
    """The dtype adapters are stacked in for `gather_mm`: MLX's CPU kernel takes float32 only."""
    return dtype if mx.default_device().type == mx.DeviceType.gpu else mx.float32


# addmm on a (B, M, in) batch runs one product per matrix, reading the weight each time. That is
# cheaper than folding the rows into one matrix (three reshapes in the graph) only while the weight
# bytes read stay this small; past it, the rows are folded.
ADDMM_BATCH_BYTES = 512 * 1024


def _plain(module: nn.Module, **values: Any) -> None:
    """Set attributes outside the module's members: never parameters, and read without the
    module's __getattr__, which keeps each decode step's Python short."""
    for name, value in values.items():
        object.__setattr__(module, name, value)


class LoRALinear(nn.Module):
    """The base layer plus its resident adapters. The base weight is read when the layer is
    wrapped; a wrapped layer's base is not replaced (fuse refuses wrapped layers)."""

    def __init__(self, base: nn.Module, context: LoRAContext):
        super().__init__()
        self.base = base
        # The weight's transpose is a view (no copy), made once rather than as a graph node per call.
        weight_t = base.weight.T if type(base) is nn.Linear and "bias" not in base else None
        _plain(self, _context=context, _adapters={}, _batched={}, _stacked=None, _mixed=None, _weight_t=weight_t,
               _addmm_matrices=max(1, ADDMM_BATCH_BYTES // weight_t.nbytes) if weight_t is not None else 0,
               _plan=None, _plan_version=-1)

    def add(self, slot: int, weights: LoRAWeights, dtype: mx.Dtype) -> None:
        a, b = weights.a.astype(dtype), weights.b.astype(dtype)
        self._adapters[slot] = LoRAWeights(a, b, weights.scale)
        self._batched[slot] = (a[None], b[None])  # views, so a (1, T, in) input multiplies without reshapes
        _plain(self, _stacked=None, _mixed=None, _plan=None)

    def remove(self, slot: int) -> None:
        self._adapters.pop(slot, None)
        self._batched.pop(slot, None)
        _plain(self, _stacked=None, _mixed=None, _plan=None)

    @property
    def is_empty(self) -> bool:
        return not self._adapters

    def _stack(self) -> tuple[mx.array, mx.array]:
        """(slots + 1, in, r_max) and (slots + 1, r_max, out), zero where a slot has no adapter."""
        if self._stacked is None:
            n_slots, rank = max(self._adapters) + 1, max(w.rank for w in self._adapters.values())
            first = next(iter(self._adapters.values()))
            dtype = _gather_dtype(first.a.dtype)
            a = mx.zeros((n_slots, first.a.shape[0], rank), dtype)
            b = mx.zeros((n_slots, rank, first.b.shape[1]), dtype)
            for slot, w in self._adapters.items():
                a[slot, :, : w.rank] = w.a
                b[slot, : w.rank, :] = w.b
            _plain(self, _stacked=(a, b))
        return self._stacked

    def __call__(self, x: mx.array) -> mx.array:
        if self._plan is None or self._plan_version != self._context.version:
            _plain(self, _plan=self._make_plan(), _plan_version=self._context.version)
        return self._plan(x)

    def _make_plan(self) -> Callable[[mx.array], mx.array]:
        """What every call runs until the rows or the adapters change. A decode step calls each layer
        once per token, and on a small model the Python of a call is a visible part of the step, so
        the choice between base, one adapter and mixed rows is made here, once."""
        context = self._context
        if context.single < 0:
            return self._mixed_plan()
        weights = self._adapters.get(context.single)
        if weights is None:
            weight_t = self._weight_t
            return self.base if weight_t is None else lambda x: x @ weight_t
        a, b = weights.a, weights.b
        a_one, b_one = self._batched[context.single]
        base, weight_t, most_matrices = self.base, self._weight_t, self._addmm_matrices  # no `self`: no cycle

        def one_adapter(x: mx.array) -> mx.array:
            one_matrix = x.ndim == 3 and x.shape[0] == 1  # a prompt, or a lone decode row
            delta = (x @ a_one) @ b_one if one_matrix else (x @ a) @ b
            return _with_delta(x, delta, base, weight_t, most_matrices)
        return one_adapter

    def _mixed_plan(self) -> Callable[[mx.array], mx.array]:
        mixed = self._mixed
        if mixed is None or mixed.for_rows is not self._context.rows:
            mixed = _Mixed(self._context, self._stack())
            _plain(self, _mixed=mixed)
        base, weight_t, most_matrices = self.base, self._weight_t, self._addmm_matrices
        return lambda x: _with_delta(x, mixed.delta(x), base, weight_t, most_matrices)


def _with_delta(x: mx.array, delta: mx.array, base: Any, weight_t: mx.array | None, most_matrices: int) -> mx.array:
    """The base product of x plus delta: inside the product (`addmm`) on a plain float linear, with
    a batch of rows folded into one matrix when there are more than `most_matrices` of them."""
    if weight_t is None:
        return base(x) + delta
    matrices = x.size // (x.shape[-2] * x.shape[-1]) if x.ndim > 2 else 1
    if matrices <= most_matrices:
        return mx.addmm(delta, x, weight_t)  # the add rides on the base matmul
    # addmm on a batch of matrices reads the weight once per matrix: fold the rows into one
    out = mx.addmm(delta.reshape(-1, delta.shape[-1]), x.reshape(-1, x.shape[-1]), weight_t)
    return out.reshape(*x.shape[:-1], out.shape[-1])


def context_of(model: nn.Module) -> LoRAContext:
    if not hasattr(model, "_lora_context"):
        model._lora_context = LoRAContext()
    return model._lora_context


def set_rows(model: nn.Module, slots: Sequence[int]) -> None:
    context_of(model).set(slots)


def _resolve(model: nn.Module, path: str) -> tuple[Any, str | int, nn.Module]:
    """Parent, key and module at a dotted path such as model.layers.3.mlp.up_proj."""
    parent: Any = None
    key: str | int = ""
    node: Any = model
    for part in path.split("."):
        parent, key = node, int(part) if part.isdigit() else part
        node = node[key] if isinstance(node, list) else getattr(node, key)
    return parent, key, node


def _replace(parent: Any, key: str | int, module: nn.Module) -> None:
    if isinstance(parent, list):
        parent[key] = module
    else:
        setattr(parent, key, module)


def linear_dims(model: nn.Module) -> dict[str, tuple[int, int]]:
    """(in, out) of every linear layer (plain, quantized or already wrapped), by path."""
    dims = {}
    for path, module in model.named_modules():
        if isinstance(module, LoRALinear):
            continue
        if isinstance(module, nn.QuantizedLinear):
            dims[path.removesuffix(".base")] = (module.scales.shape[-1] * module.group_size, module.weight.shape[0])
        elif isinstance(module, nn.Linear):
            dims[path.removesuffix(".base")] = (module.weight.shape[1], module.weight.shape[0])
    return dims


def _weight_dtype(module: nn.Module, activations: mx.Dtype) -> mx.Dtype:
    """The dtype a layer's adapter computes in: its weight's, or with a quantized weight its scales'
    (affine), or the activations' where the scales are not floating point (mxfp4, nvfp4, mxfp8)."""
    dtype = module.scales.dtype if isinstance(module, nn.QuantizedLinear) else module.weight.dtype
    return dtype if mx.issubdtype(dtype, mx.floating) else activations


def _activation_dtype(model: nn.Module) -> mx.Dtype:
    """The dtype the model computes in: that of its final norm's weight (never quantized)."""
    return model.model.norm.weight.dtype


def install(model: nn.Module, adapter: Adapter, slot: int) -> None:
    context, activations = context_of(model), _activation_dtype(model)
    for path, weights in adapter.modules.items():
        parent, key, module = _resolve(model, path)
        if not isinstance(module, LoRALinear):
            module = LoRALinear(module, context)
            _replace(parent, key, module)
        module.add(slot, weights, _weight_dtype(module.base, activations))


def _lora_layers(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    for path, module in list(model.named_modules()):
        if isinstance(module, LoRALinear):
            yield path, module


def uninstall(model: nn.Module, slot: int) -> None:
    for path, module in _lora_layers(model):
        module.remove(slot)
        if module.is_empty:
            parent, key, _ = _resolve(model, path)
            _replace(parent, key, module.base)


def fuse(model: nn.Module, adapter: Adapter) -> int:
    """Merge the adapter into the base weights; return how many quantized layers were dequantized."""
    dequantized = 0
    for path, weights in adapter.modules.items():
        parent, key, base = _resolve(model, path)
        if isinstance(base, LoRALinear):
            raise ValueError(f"{path} serves resident adapters: fuse into a model without adapters")
        weight = base.weight
        if isinstance(base, nn.QuantizedLinear):
            mode = getattr(base, "mode", "affine")  # mxfp4/nvfp4/mxfp8 layers have no biases
            weight = mx.dequantize(base.weight, base.scales, getattr(base, "biases", None), base.group_size,
                                   base.bits, **({"mode": mode} if mode != "affine" else {}))
            dequantized += 1
        delta = (weights.a @ weights.b).T  # (out, in), float32, scale folded in
        fused = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        fused.weight = (weight.astype(mx.float32) + delta).astype(weight.dtype)
        _replace(parent, key, fused)
    mx.eval(model.parameters())
    return dequantized
