"""LoRA: PEFT goldens, mlx-lm files, fused mode, mixed-adapter batches, refusals, residency."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import mlx_gemma
from mlx_gemma.lora.adapters import AdapterError
from mlx_gemma.lora.layers import LoRAContext, LoRALinear, set_rows
from mlx_gemma.lora.store import AdapterBusyError

from conftest import FIXTURES

ADAPTERS = FIXTURES / "adapters"
CASES_2B = ["all7_r8", "regex_subset", "layers_subset", "rslora_patterns", "second_all7_r8"]


def reference(case: str) -> list[tuple[list[int], np.ndarray]]:
    data = np.load(ADAPTERS / case / "reference_logits.npz")
    n = len([k for k in data if k.startswith("ids_")])
    return [(data[f"ids_{i}"].tolist(), data[f"logits_{i}"]) for i in range(n)]


@pytest.fixture(scope="module")
def lora_runtime(tiny_dir) -> mlx_gemma.Runtime:
    return mlx_gemma.load(tiny_dir, adapters={case: str(ADAPTERS / case) for case in CASES_2B})


@pytest.mark.parametrize("case", CASES_2B)
def test_logits_match_peft(lora_runtime, case):
    for ids, expected in reference(case):
        np.testing.assert_allclose(lora_runtime.logits(ids, lora=case), expected, atol=1e-4, rtol=0)


def test_adapter_changes_the_output(lora_runtime):
    ids, expected = reference("all7_r8")[0]
    assert np.abs(lora_runtime.logits(ids) - expected).max() > 0.05


def test_multi_head_shape_matches_peft(tiny_dirs):
    runtime = mlx_gemma.load(tiny_dirs["7b"], adapters={"a": str(ADAPTERS / "all7_r8_7b")})
    for ids, expected in reference("all7_r8_7b"):
        np.testing.assert_allclose(runtime.logits(ids, lora="a"), expected, atol=1e-4, rtol=0)


def to_mlx_lm(peft_dir: Path, out: Path) -> Path:
    """The same adapter in mlx-lm's layout: lora_a (in, r), lora_b (r, out), a stored scale."""
    config = json.loads((peft_dir / "adapter_config.json").read_text())
    tensors = load_file(str(peft_dir / "adapter_model.safetensors"))
    converted = {}
    for key, value in tensors.items():
        module = key.removeprefix("base_model.model.").split(".lora_")[0]
        converted[f"{module}.lora_{'a' if '.lora_A.' in key else 'b'}"] = np.ascontiguousarray(value.T)
    out.mkdir(parents=True)
    save_file(converted, str(out / "adapters.safetensors"))
    params = {"rank": config["r"], "scale": config["lora_alpha"] / config["r"], "dropout": 0.0,
              "keys": sorted({k.split(".", 3)[3].rsplit(".", 1)[0] for k in converted})}
    (out / "adapter_config.json").write_text(json.dumps({"fine_tune_type": "lora", "num_layers": 2,
                                                         "lora_parameters": params}))
    return out


def test_mlx_lm_format_equals_the_peft_adapter(tiny_dir, tmp_path):
    runtime = mlx_gemma.load(tiny_dir, adapters={"mlx": str(to_mlx_lm(ADAPTERS / "all7_r8", tmp_path / "m"))})
    assert runtime.adapters()[0]["format"] == "mlx-lm"
    for ids, expected in reference("all7_r8"):
        np.testing.assert_allclose(runtime.logits(ids, lora="mlx"), expected, atol=1e-4, rtol=0)


def test_fused_equals_unfused(tiny_dir, lora_runtime):
    fused = mlx_gemma.load(tiny_dir, adapters={"a": str(ADAPTERS / "rslora_patterns")}, fuse="a")
    assert fused.adapters() == [] and fused.fused["name"] == "a"
    for ids, _ in reference("rslora_patterns"):
        np.testing.assert_allclose(fused.logits(ids), lora_runtime.logits(ids, lora="rslora_patterns"), atol=1e-4)
        np.testing.assert_allclose(fused.logits(ids, lora="a"), fused.logits(ids))


def test_fuse_into_quantized_base_keeps_the_delta(tiny_dir):
    unfused = mlx_gemma.load(tiny_dir, quantize=8, adapters={"a": str(ADAPTERS / "all7_r8")})
    fused = mlx_gemma.load(tiny_dir, quantize=8, adapters={"a": str(ADAPTERS / "all7_r8")}, fuse="a")
    assert fused.fused["dequantized_layers"] == 14
    assert "dequantized to float32" in fused.fused["precision"]
    ids, _ = reference("all7_r8")[0]
    np.testing.assert_allclose(fused.logits(ids), unfused.logits(ids, lora="a"), atol=1e-4)


def _normal(*shape: int, seed: int) -> mx.array:
    return mx.random.normal(shape, key=mx.random.key(seed))


def test_two_adapters_in_one_batch_at_the_layer():
    from mlx_gemma.lora.adapters import LoRAWeights

    base = _normal(4, 6, seed=0)
    layer = LoRALinear(lambda x: x @ base, LoRAContext())
    layer.add(1, LoRAWeights(_normal(4, 2, seed=1), _normal(2, 6, seed=2), 1.0), mx.float32)
    layer.add(3, LoRAWeights(_normal(4, 3, seed=3), _normal(3, 6, seed=4), 1.0), mx.float32)  # other rank
    x = _normal(3, 5, 4, seed=5)
    layer._context.set([3, 0, 1])
    mixed = np.array(layer(x))
    for row, slot in enumerate([3, 0, 1]):
        layer._context.set([slot])
        np.testing.assert_allclose(mixed[row], np.array(layer(x[row:row + 1]))[0], atol=1e-5)
    layer._context.set([0])
    np.testing.assert_allclose(mixed[1], np.array(x[1] @ base), atol=1e-6)


@pytest.mark.parametrize("width", [16, 512])  # a weight small enough for addmm per row, and one folded
def test_linear_layer_with_mixed_rows_matches_each_row_alone(width):
    import mlx.nn as nn
    from mlx_gemma.lora.adapters import LoRAWeights

    base = nn.Linear(width, 2 * width, bias=False)
    base.weight = _normal(2 * width, width, seed=0)
    layer = LoRALinear(base, LoRAContext())
    layer.add(1, LoRAWeights(_normal(width, 4, seed=1), _normal(4, 2 * width, seed=2), 1.0), mx.float32)
    layer.add(2, LoRAWeights(_normal(width, 2, seed=3), _normal(2, 2 * width, seed=4), 1.0), mx.float32)
    x = _normal(4, 1, width, seed=5)  # four decode rows
    layer._context.set([2, 0, 1, 2])
    mixed = np.array(layer(x))
    assert mixed.shape == (4, 1, 2 * width)
    for row, slot in enumerate([2, 0, 1, 2]):
        layer._context.set([slot])
        np.testing.assert_allclose(mixed[row], np.array(layer(x[row:row + 1]))[0], rtol=1e-5, atol=1e-4)
    expected = np.array(x[1] @ base.weight.T)
    np.testing.assert_allclose(mixed[1], expected, rtol=1e-5, atol=1e-4)


def test_two_adapters_in_one_batch_at_the_model(lora_runtime):
    model = lora_runtime.model
    ids = reference("all7_r8")[2][0][:8]
    slots = [lora_runtime.registry.acquire(n) for n in ("all7_r8", "second_all7_r8")]
    try:
        set_rows(model, [slots[0], 0, slots[1]])
        batch = np.array(model(mx.array([ids, ids, ids])))
        for row, name in enumerate(["all7_r8", None, "second_all7_r8"]):
            np.testing.assert_allclose(batch[row], lora_runtime.logits(ids, lora=name), atol=1e-4)
    finally:
        for name in ("all7_r8", "second_all7_r8"):
            lora_runtime.registry.release(name)


def test_generate_with_adapter_differs_and_is_reproducible(lora_runtime):
    base = lora_runtime.generate(prompt="Water boils at", raw=True, temperature=0, max_tokens=12)
    adapted = lora_runtime.generate(prompt="Water boils at", raw=True, temperature=0, max_tokens=12, lora="all7_r8")
    again = lora_runtime.stream(prompt="Water boils at", raw=True, temperature=0, max_tokens=12, lora="all7_r8")
    assert adapted.token_ids != base.token_ids
    assert "".join(again) == adapted.text


def copy_adapter(tmp_path: Path, case: str = "all7_r8") -> Path:
    target = tmp_path / f"bad_{case}"
    shutil.copytree(ADAPTERS / case, target)
    (target / "reference_logits.npz").unlink()
    return target


def edit_config(path: Path, **changes) -> Path:
    config = json.loads((path / "adapter_config.json").read_text())
    (path / "adapter_config.json").write_text(json.dumps({**config, **changes}))
    return path


def edit_tensors(path: Path, change) -> Path:
    tensors = load_file(str(path / "adapter_model.safetensors"))
    save_file(change(tensors), str(path / "adapter_model.safetensors"))
    return path


def rename_module(tensors):
    return {k.replace("layers.0.self_attn.q_proj", "layers.0.self_attn.x_proj"): v for k, v in tensors.items()}


def shrink_one(tensors):
    key = next(k for k in tensors if "lora_B" in k)
    return {**tensors, key: tensors[key][:-1]}


def poison(tensors):
    key = next(iter(tensors))
    bad = tensors[key].copy()
    bad.flat[0] = np.nan
    return {**tensors, key: bad}


def pickle_weights(path: Path) -> Path:
    (path / "adapter_model.safetensors").rename(path / "adapter_model.bin")
    return path


def corrupt_weights(path: Path) -> Path:
    (path / "adapter_model.safetensors").write_bytes(b"\x00garbage")
    return path


def drop_config(path: Path) -> Path:
    (path / "adapter_config.json").unlink()
    return path


def two_adapter_names(tensors):
    """Each lora_B twice, as a second adapter name ("other") beside PEFT's "default"."""
    return {**tensors, **{k.replace("lora_B.weight", "lora_B.other.weight"): v for k, v in tensors.items()
                          if "lora_B" in k}}


REFUSALS = {
    "dora": (lambda p: edit_config(p, use_dora=True), "DoRA adapters are not served"),
    "modules_to_save": (lambda p: edit_config(p, modules_to_save=["lm_head"]), "modules_to_save ['lm_head'] is refused"),
    "bias": (lambda p: edit_config(p, bias="all"), "bias 'all' is not served"),
    "model_type": (lambda p: edit_config(p, model_type="llama"), "model_type 'llama' is not this base's family (gemma)"),
    "pickled": (pickle_weights, "pickled adapter_model.bin weights are refused"),
    "unknown_module": (lambda p: edit_tensors(p, rename_module), "unknown module 'model.layers.0.self_attn.x_proj'"),
    "shape": (lambda p: edit_tensors(p, shrink_one), "do not fit the base layer"),
    "nan": (lambda p: edit_tensors(p, poison), "NaN or infinite"),
    "rank": (lambda p: p, "rank 8 is over the limit of 4"),
    "corrupt": (corrupt_weights, "not a valid safetensors file"),
    "no_config": (drop_config, "no adapter_config.json"),
    "model_type_list": (lambda p: edit_config(p, model_type=["gemma"]), "model_type ['gemma'] is refused: give a "
                                                                         "string such as 'gemma'"),
    "lora_ga": (lambda p: edit_config(p, init_lora_weights="lora_ga"), "init_lora_weights 'lora_ga' is refused"),
    "two_names": (lambda p: edit_tensors(p, two_adapter_names), "are both lora_B of model.layers.0.self_attn.q_proj: "
                                                                 "save one adapter per directory"),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_refused_adapters_leave_the_runtime_serving(tiny_dir, tmp_path, case):
    runtime = mlx_gemma.load(tiny_dir, adapters={"good": str(ADAPTERS / "all7_r8")})
    ids, expected = reference("all7_r8")[0]
    make_bad, message = REFUSALS[case]
    if case == "rank":
        from mlx_gemma.lora.adapters import AdapterLimits
        runtime.registry.limits = AdapterLimits(max_rank=4)
    with pytest.raises(AdapterError) as err:
        runtime.add_adapter("bad", str(make_bad(copy_adapter(tmp_path))))
    assert message in str(err.value)
    assert [a["name"] for a in runtime.adapters()] == ["good"]
    np.testing.assert_allclose(runtime.logits(ids, lora="good"), expected, atol=1e-4)


def test_a_module_named_in_full_is_adapted_whatever_layers_to_transform_says(tiny_dir, tmp_path):
    # PEFT's rule: layers_to_transform filters only the modules matched by suffix.
    kept = ("model.layers.0.self_attn.q_proj.", "model.layers.1.self_attn.v_proj.")
    path = edit_tensors(copy_adapter(tmp_path), lambda t: {k: v for k, v in t.items() if any(m in k for m in kept)})
    edit_config(path, target_modules=["model.layers.0.self_attn.q_proj", "v_proj"], layers_to_transform=[1])
    runtime = mlx_gemma.load(tiny_dir, adapters={"named": str(path)})
    assert runtime.adapters()[0]["modules"] == 2
    stray = edit_tensors(copy_adapter(tmp_path, "second_all7_r8"), lambda t: {k: v for k, v in t.items() if
                                                                             "layers.0.self_attn.v_proj." in k})
    edit_config(stray, target_modules=["model.layers.0.self_attn.q_proj", "v_proj"], layers_to_transform=[1])
    with pytest.raises(AdapterError, match="layers.0.self_attn.v_proj has weights but target_modules"):
        runtime.add_adapter("stray", str(stray))


@pytest.mark.parametrize("params, message", [
    ({"rank": 8, "alpha": 16}, "lora_parameters has no 'scale' (mlx-lm's scale plays the part of alpha / rank"),
    ({"rank": 8, "scale": "2"}, "lora_parameters.scale '2' is refused: give a finite number"),
])
def test_an_mlx_lm_config_needs_a_numeric_scale(tiny_dir, tmp_path, params, message):
    path = to_mlx_lm(ADAPTERS / "all7_r8", tmp_path / "m")
    (path / "adapter_config.json").write_text(json.dumps({"fine_tune_type": "lora", "lora_parameters": params}))
    with pytest.raises(AdapterError) as err:
        mlx_gemma.load(tiny_dir, adapters={"m": str(path)})
    assert message in str(err.value)


def test_every_problem_is_listed_at_once(tiny_dir, tmp_path):
    path = edit_config(copy_adapter(tmp_path), use_dora=True, bias="all", modules_to_save=["lm_head"])
    with pytest.raises(AdapterError) as err:
        mlx_gemma.load(tiny_dir, adapters={"bad": str(path)})
    assert len(err.value.problems) == 3


def test_file_size_limit(tiny_dir):
    from mlx_gemma.lora.adapters import AdapterLimits
    runtime = mlx_gemma.load(tiny_dir)
    runtime.registry.limits = AdapterLimits(max_file_bytes=1000)
    with pytest.raises(AdapterError, match="over the limit of 1000"):
        runtime.add_adapter("big", str(ADAPTERS / "all7_r8"))


def test_unknown_lora_name(lora_runtime):
    with pytest.raises(ValueError, match="lora='nope': no adapter of that name is loaded"):
        lora_runtime.generate(prompt="x", lora="nope")


def base_weight_ids(model) -> list[int]:
    return [id(layer.self_attn.q_proj.base.weight if hasattr(layer.self_attn.q_proj, "base")
               else layer.self_attn.q_proj.weight) for layer in model.layers]


def test_switching_and_eviction_never_copy_the_base(tiny_dir):
    runtime = mlx_gemma.load(tiny_dir, max_resident_adapters=2)
    before = base_weight_ids(runtime.model)
    for case in ("all7_r8", "second_all7_r8", "rslora_patterns"):
        runtime.add_adapter(case, str(ADAPTERS / case))
    resident = {a["name"]: a["resident"] for a in runtime.adapters()}
    assert resident == {"all7_r8": False, "second_all7_r8": True, "rslora_patterns": True}
    for case in ("all7_r8", "second_all7_r8", "all7_r8"):  # reloads the evicted one on demand
        ids, expected = reference(case)[0]
        np.testing.assert_allclose(runtime.logits(ids, lora=case), expected, atol=1e-4)
    assert base_weight_ids(runtime.model) == before
    runtime.remove_adapter("all7_r8")
    runtime.remove_adapter("second_all7_r8")
    runtime.remove_adapter("rslora_patterns")
    assert runtime.adapters() == []
    assert not hasattr(runtime.model.layers[0].self_attn.q_proj, "base")  # unwrapped: plain base again


def test_adapters_in_use_are_not_evicted(tiny_dir):
    runtime = mlx_gemma.load(tiny_dir, max_resident_adapters=1, adapters={"a": str(ADAPTERS / "all7_r8")})
    runtime.registry.acquire("a")
    runtime.add_adapter("b", str(ADAPTERS / "second_all7_r8"))  # known, loaded when a slot is free
    assert [(a["name"], a["resident"]) for a in runtime.adapters()] == [("a", True), ("b", False)]
    with pytest.raises(AdapterBusyError, match="all 1 resident adapters are in use"):
        runtime.registry.acquire("b")
    runtime.registry.release("a")
    assert runtime.registry.acquire("b") == 1  # "a" is idle now: evicted for "b"
    runtime.registry.release("b")
    assert [(a["name"], a["resident"]) for a in runtime.adapters()] == [("a", False), ("b", True)]


def test_fuse_needs_a_named_adapter(tiny_dir):
    with pytest.raises(ValueError, match="fuse='x' names no adapter"):
        mlx_gemma.load(tiny_dir, fuse="x")


def test_the_content_hash_is_of_the_bytes_loaded_even_when_a_file_is_replaced_meanwhile(tiny_dir, tmp_path,
                                                                                         monkeypatch):
    """A re-upload that replaces the weights while they are read must not give the old weights the new
    hash: the prefix cache, keyed by it, would then serve the old adapter's KV to the new one."""
    from mlx_gemma.lora import adapters
    rt = mlx_gemma.load(tiny_dir)
    base = rt.registry.base_info()
    first, second = tmp_path / "first", tmp_path / "second"
    shutil.copytree(FIXTURES / "adapters" / "all7_r8", first)
    shutil.copytree(FIXTURES / "adapters" / "second_all7_r8", second)
    expected = adapters.read_adapter(first, base)
    loaded_tensors = adapters._load_tensors

    def load_then_replace(*args):
        tensors = loaded_tensors(*args)
        shutil.copy(second / "adapter_model.safetensors", first / "adapter_model.safetensors")
        return tensors

    monkeypatch.setattr(adapters, "_load_tensors", load_then_replace)
    raced = adapters.read_adapter(first, base)
    assert raced.content_hash == expected.content_hash
    module = next(iter(expected.modules))
    assert mx.array_equal(raced.modules[module].a, expected.modules[module].a)
    rt.close()


def test_fuse_into_an_mxfp4_base_dequantizes_with_its_mode(tiny_dir):
    import mlx.nn as nn
    from mlx_gemma.loading import load_model
    from mlx_gemma.lora import adapters, layers
    loaded = load_model(tiny_dir)
    nn.quantize(loaded.model, group_size=32, bits=4, mode="mxfp4",
                class_predicate=lambda path, module: isinstance(module, nn.Linear) and "proj" in path)
    q_proj = loaded.model.model.layers[0].self_attn.q_proj
    dense = mx.dequantize(q_proj.weight, q_proj.scales, None, 32, 4, mode="mxfp4")
    adapter = adapters.read_adapter(ADAPTERS / "all7_r8", adapters.BaseInfo("gemma", layers.linear_dims(loaded.model)))
    assert layers.fuse(loaded.model, adapter) == 14
    weights = adapter.modules["model.layers.0.self_attn.q_proj"]
    expected = dense + (weights.a @ weights.b).T
    fused = loaded.model.model.layers[0].self_attn.q_proj.weight  # in the dequantized dtype, bfloat16
    assert mx.allclose(fused.astype(mx.float32), expected, atol=4e-3).item()


def test_a_resident_adapter_on_an_mxfp4_base_computes_in_the_activations_dtype(tiny_dir):
    """mxfp4 scales are uint8: the adapter must not be cast to them (it would round to zero)."""
    import mlx.nn as nn
    from mlx_gemma.loading import load_model
    from mlx_gemma.lora import adapters, layers
    loaded = load_model(tiny_dir)
    nn.quantize(loaded.model, group_size=32, bits=4, mode="mxfp4",
                class_predicate=lambda path, module: isinstance(module, nn.Linear) and "proj" in path)
    adapter = adapters.read_adapter(ADAPTERS / "all7_r8", adapters.BaseInfo("gemma", layers.linear_dims(loaded.model)))
    ids = mx.array([[2, 415, 515, 379]])
    layers.set_rows(loaded.model, [0])
    base = loaded.model(ids)
    layers.install(loaded.model, adapter, 1)
    layers.set_rows(loaded.model, [1])
    unfused = loaded.model(ids)
    q_proj = loaded.model.model.layers[0].self_attn.q_proj
    assert q_proj._adapters[1].a.dtype == mx.float32  # the model's dtype, not the scales' uint8
    layers.set_rows(loaded.model, [0])
    layers.uninstall(loaded.model, 1)
    layers.fuse(loaded.model, adapter)
    fused = loaded.model(ids)
    effect = mx.abs(unfused - base).max().item()
    assert effect > 1.0
    assert mx.abs(unfused - fused).max().item() < 0.05 * effect  # fused weights are rounded to bfloat16


def test_a_second_fuse_is_refused_instead_of_adding_its_delta_on_top(tiny_dir):
    runtime = mlx_gemma.load(tiny_dir, adapters={"a": str(ADAPTERS / "all7_r8")}, fuse="a")
    ids, expected = reference("all7_r8")[0]
    with pytest.raises(ValueError, match="'a' is already fused into these weights: one adapter is fused per load"):
        runtime.fuse_adapter("b", str(ADAPTERS / "second_all7_r8"))
    np.testing.assert_allclose(runtime.logits(ids), expected, atol=1e-4)


def test_an_adapter_for_another_model_is_summarised(tiny_dir, tmp_path):
    """An adapter for a wider model (one more input column everywhere): every module mismatches; a few
    are said."""
    from mlx_gemma.lora.adapters import MAX_PROBLEMS_SHOWN
    wider = edit_tensors(copy_adapter(tmp_path), lambda tensors: {
        k: np.pad(v, ((0, 0), (0, 1))) if "lora_A" in k else v for k, v in tensors.items()})
    runtime = mlx_gemma.load(tiny_dir)
    with pytest.raises(AdapterError) as err:
        runtime.add_adapter("other", str(wider))
    assert len(err.value.problems) > MAX_PROBLEMS_SHOWN
    shown = str(err.value).split(" refused: ")[1].split("; ")
    assert len(shown) == MAX_PROBLEMS_SHOWN + 1
    assert shown[-1] == f"and {len(err.value.problems) - MAX_PROBLEMS_SHOWN} more like these"


@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16, mx.float32])
def test_rows_with_different_adapters_match_each_adapter_alone(dtype: mx.Dtype) -> None:
    """The mixed path (gather_mm, which MLX's CPU runs in float32 only) gives each row exactly what
    that row's adapter gives alone, in every dtype."""
    import mlx.nn as nn
    from mlx_gemma.lora.adapters import LoRAWeights
    from mlx_gemma.lora.layers import LoRAContext, LoRALinear

    mx.random.seed(3)
    base = nn.Linear(64, 48, bias=False)
    base.weight = base.weight.astype(dtype)
    context = LoRAContext()
    layer = LoRALinear(base, context)
    for slot, rank in ((1, 8), (2, 4)):
        layer.add(slot, LoRAWeights(mx.random.normal((64, rank)), mx.random.normal((rank, 48)), 1.0), dtype)
    x = mx.random.normal((6, 1, 64)).astype(dtype)
    slots = [1, 2, 0, 2, 1, 1]
    context.set(slots)
    together = layer(x)
    for row, slot in enumerate(slots):
        context.set([slot])
        alone = layer(x[row:row + 1])
        assert together.dtype == dtype
        assert mx.array_equal(together[row:row + 1], alone).item(), (row, slot)


@pytest.mark.parametrize("rows", [[1, 1], [1, 0], [2, 1]])
def test_a_layer_follows_its_adapters_changing_under_unchanged_rows(rows: list[int]) -> None:
    """A layer keeps its choice of path while the rows stay the same; replacing or removing an
    adapter under those rows must still take effect at the next call."""
    import mlx.nn as nn
    from mlx_gemma.lora.adapters import LoRAWeights

    base = nn.Linear(8, 6, bias=False)
    base.weight = _normal(6, 8, seed=0)
    context = LoRAContext()
    layer = LoRALinear(base, context)
    adapters = {seed: LoRAWeights(_normal(8, 2, seed=seed), _normal(2, 6, seed=seed + 1), 1.0) for seed in (1, 3, 5)}
    layer.add(2, adapters[5], mx.float32)
    x = _normal(2, 1, 8, seed=7)
    context.set(rows)

    def expected(slot_weights: dict[int, LoRAWeights]) -> np.ndarray:
        out = [x[i] @ base.weight.T + ((x[i] @ slot_weights[s].a) @ slot_weights[s].b if s in slot_weights else 0)
               for i, s in enumerate(rows)]
        return np.array(mx.stack(out))

    for weights in (adapters[1], adapters[3]):
        np.testing.assert_allclose(np.array(layer(x)), expected({2: adapters[5]}), rtol=1e-5, atol=1e-5)
        layer.add(1, weights, mx.float32)
        np.testing.assert_allclose(np.array(layer(x)), expected({1: weights, 2: adapters[5]}), rtol=1e-5, atol=1e-5)
        layer.remove(1)
    np.testing.assert_allclose(np.array(layer(x)), expected({2: adapters[5]}), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows", [[0], [1], [1, 2]])
def test_a_called_layer_is_freed_without_waiting_for_the_cycle_collector(rows: list[int]) -> None:
    """The function a layer keeps for its rows must not hold the layer itself: a dropped model's
    weights are freed at once, not at the next garbage-collection pass."""
    import gc
    import weakref

    import mlx.nn as nn
    from mlx_gemma.lora.adapters import LoRAWeights

    base = nn.Linear(8, 6, bias=False)
    context = LoRAContext()
    layer = LoRALinear(base, context)
    for slot in (1, 2):
        layer.add(slot, LoRAWeights(_normal(8, 2, seed=slot), _normal(2, 6, seed=slot + 2), 1.0), mx.float32)
    context.set(rows)
    mx.eval(layer(_normal(len(rows), 1, 8, seed=9)))
    alive = weakref.ref(layer)
    gc.disable()
    try:
        del layer
        assert alive() is None
    finally:
        gc.enable()
