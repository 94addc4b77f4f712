"""LoRA adapters: reading and validating files (adapters), serving them per batch row or
fused (layers), and the registry of known and resident adapters (store)."""
