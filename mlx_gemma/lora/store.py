"""Known adapters and the resident ones: an LRU of at most `max_resident` in the model.

Contract: `add(name, path)` reads and validates the adapter first (an `AdapterError` leaves
everything as it was), then makes it resident. `acquire(name)` returns the adapter's slot for
a request, loading it again from its path if it was evicted; `release(name)` ends that use.
When a new adapter needs room, the least recently used adapter that no request is using is
evicted (it stays known and reloads on demand); if every resident adapter is in use, the
request is refused with a message saying so. `remove(name)` forgets an adapter.
Switching between resident adapters copies nothing: each request just carries a slot.
"""

from __future__ import annotations

import threading
from collections import Counter, OrderedDict
from pathlib import Path
from typing import Any

import mlx.nn as nn

from . import layers
from .adapters import Adapter, AdapterLimits, BaseInfo, read_adapter


class AdapterBusyError(RuntimeError):
    """Every resident adapter is in use and none can be evicted to make room."""


class AdapterRegistry:
    def __init__(self, model: nn.Module, family: str, max_resident: int = 8,
                 limits: AdapterLimits = AdapterLimits()):
        self.model = model
        self.family = family
        self.max_resident = max_resident
        self.limits = limits
        self._paths: dict[str, Path] = {}
        self._resident: OrderedDict[str, tuple[Adapter, int]] = OrderedDict()
        self._in_use: Counter[str] = Counter()
        self._lock = threading.RLock()

    def base_info(self) -> BaseInfo:
        return BaseInfo(self.family, layers.linear_dims(self.model))

    def read(self, name: str, path: str | Path) -> Adapter:
        return read_adapter(path, self.base_info(), name=name, limits=self.limits)

    def add(self, name: str, path: str | Path) -> Adapter:
        _check_name(name)
        adapter = self.read(name, path)  # validate before touching anything
        with self._lock:
            if self._in_use[name]:
                raise AdapterBusyError(f"adapter {name!r} is in use by a running request: replace it when it finishes")
            if name in self._resident:
                self._evict(name)
            self._make_room()
            self._paths[name] = Path(path)
            self._install(adapter)
        return adapter

    def _install(self, adapter: Adapter) -> int:
        used = {slot for _, slot in self._resident.values()}
        slot = next(s for s in range(1, len(used) + 2) if s not in used)
        layers.install(self.model, adapter, slot)
        self._resident[adapter.name] = (adapter, slot)
        return slot

    def _evict(self, name: str) -> None:
        _, slot = self._resident.pop(name)
        layers.uninstall(self.model, slot)

    def _make_room(self) -> None:
        while len(self._resident) >= self.max_resident:
            idle = [n for n in self._resident if not self._in_use[n]]
            if not idle:
                raise AdapterBusyError(f"all {self.max_resident} resident adapters are in use: "
                                       "retry when a request finishes, or raise the resident limit")
            self._evict(idle[0])  # OrderedDict order: least recently used first

    def remove(self, name: str) -> None:
        with self._lock:
            if name not in self._paths:
                raise KeyError(name)
            if self._in_use[name]:
                raise AdapterBusyError(f"adapter {name!r} is in use by a running request: remove it when it finishes")
            if name in self._resident:
                self._evict(name)
            del self._paths[name]

    def acquire(self, name: str) -> int:
        with self._lock:
            if name not in self._paths:
                raise KeyError(name)
            if name not in self._resident:
                self._make_room()
                self._install(self.read(name, self._paths[name]))
            self._resident.move_to_end(name)
            self._in_use[name] += 1
            return self._resident[name][1]

    def release(self, name: str) -> None:
        with self._lock:
            self._in_use[name] -= 1

    def get(self, name: str) -> Adapter | None:
        entry = self._resident.get(name)
        return entry[0] if entry else None

    def names(self) -> list[str]:
        return list(self._paths)

    def describe(self) -> list[dict[str, Any]]:
        with self._lock:
            rows = []
            for name, path in self._paths.items():
                adapter = self.get(name)
                info = adapter.describe() if adapter else {"name": name, "path": str(path)}
                rows.append({**info, "resident": adapter is not None, "in_use": self._in_use[name]})
            return rows


def _check_name(name: Any) -> None:
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"adapter name {name!r} must be a non-empty string")
