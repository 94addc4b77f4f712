"""The fine-tune store: rows and files on local disk, refusals that change nothing, recovery after a crash."""

from __future__ import annotations

import io
import json
import re
import os
import signal
import struct
import subprocess
import sys
import threading
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from mlx_gemma.lora.adapters import AdapterError, check_adapter_files
from mlx_gemma.lora.store import (ASSET_NAMES, AssetError, AssetTooLarge, Finetune, FinetuneError, FinetuneExists,
                                  FinetuneNotFound, FinetuneStore)

from conftest import FIXTURES

ADAPTER = FIXTURES / "adapters" / "all7_r8"
CONFIG, WEIGHTS = ASSET_NAMES
MODEL = "@cf/google/gemma-2b-it-lora"
FIELDS = {"id", "name", "model", "description", "public", "created_at", "modified_at"}


def fixture_bytes(file_name: str) -> bytes:
    return (ADAPTER / file_name).read_bytes()


def config_bytes(**changes) -> bytes:
    return json.dumps({**json.loads(fixture_bytes(CONFIG)), **changes}).encode()


def safetensors_bytes(tmp_path: Path, tensors: dict[str, np.ndarray]) -> bytes:
    file = tmp_path / "built.safetensors"
    save_file(tensors, str(file))
    return file.read_bytes()


def wrong_shape_weights(tmp_path: Path) -> bytes:
    tensors = load_file(str(ADAPTER / WEIGHTS))
    key = next(k for k in tensors if k.endswith("q_proj.lora_A.weight"))
    tensors[key] = np.zeros((tensors[key].shape[0], tensors[key].shape[1] + 1), np.float32)
    return safetensors_bytes(tmp_path, tensors)


@pytest.fixture
def base(runtime):
    return runtime.registry.base_info()


@pytest.fixture
def store(tmp_path, base) -> FinetuneStore:
    """The real wiring: every upload validated against the tiny base model."""
    return FinetuneStore(tmp_path / "data", validate=lambda staging: check_adapter_files(staging, base))


@pytest.fixture
def bare_store(tmp_path) -> FinetuneStore:
    """No base model: the partial checks only."""
    return FinetuneStore(tmp_path / "bare")


def snapshot(store: FinetuneStore) -> list[tuple[dict, tuple[str, ...], dict[str, bytes]]]:
    """Everything a refusal must leave as it was: rows, files present, their bytes."""
    return [(f.to_dict(), f.files, {name: (f.path / name).read_bytes() for name in f.files}) for f in store.list()]


def assert_refused(store: FinetuneStore, error: type[Exception], match: str, call, *args) -> FinetuneError:
    before = snapshot(store)
    with pytest.raises(error, match=match) as info:
        call(*args)
    assert snapshot(store) == before
    assert store.check() == []
    assert list(store.tmp_dir.iterdir()) == []
    return info.value


# --- rows: create, get, list, delete -----------------------------------------------------------------------------


def test_create_get_list_delete_round_trip(store):
    created = store.create(MODEL, "support-bot", description="answers tickets", public=True)
    assert isinstance(created, Finetune)
    data = created.to_dict()
    assert set(data) == FIELDS
    assert data["name"] == "support-bot" and data["model"] == MODEL
    assert data["description"] == "answers tickets" and data["public"] is True
    assert data["created_at"] == data["modified_at"]
    assert created.path == store.data_dir / "finetunes" / created.id and created.path.is_dir()
    assert created.files == () and not created.complete and created.missing() == list(ASSET_NAMES)
    assert store.get(created.id) == created == store.get("support-bot")
    assert store.list() == [created]
    assert store.delete("support-bot") == created
    assert not created.path.exists() and store.list() == [] and store.check() == []
    with pytest.raises(FinetuneNotFound, match=created.id):
        store.get(created.id)
    with pytest.raises(FinetuneNotFound, match="support-bot"):
        store.delete("support-bot")


def test_ids_are_uuid4_and_times_are_utc_iso8601(store):
    finetune = store.create(MODEL, "a")
    assert len(finetune.id) == 36 and finetune.id[14] == "4"
    parsed = datetime.fromisoformat(finetune.created_at)
    assert finetune.created_at.endswith("Z") and parsed.tzinfo == timezone.utc
    assert abs((datetime.now(timezone.utc) - parsed).total_seconds()) < 60


def test_times_parse_as_pydantic_datetimes(store):
    pydantic = pytest.importorskip("pydantic")
    model = pydantic.create_model("Row", created_at=(datetime, ...), modified_at=(datetime, ...))
    row = model(**{k: v for k, v in store.create(MODEL, "a").to_dict().items() if k.endswith("_at")})
    assert row.created_at.tzinfo is not None


def test_list_is_oldest_first_and_filters_public(store):
    names = ["c", "a", "b"]
    for index, name in enumerate(names):
        store.create(MODEL, name, public=index != 1)
    assert [f.name for f in store.list()] == names
    assert [f.name for f in store.list(public_only=True)] == ["c", "b"]


def test_duplicate_name_is_refused(store):
    store.create(MODEL, "dup")
    error = assert_refused(store, FinetuneExists, "'dup'", store.create, MODEL, "dup")
    assert isinstance(error, FinetuneError) and isinstance(error, ValueError)
    assert str(error) == ("a fine-tune named 'dup' already exists: pick another name, delete that one first "
                          "(mlx-gemma finetune delete NAME), or upload new files to it "
                          "(POST .../ai/finetunes/NAME/finetune-assets)")


def test_two_threads_creating_one_name_one_wins(store):
    barrier, results = threading.Barrier(8), []

    def create() -> None:
        barrier.wait()
        try:
            results.append(store.create(MODEL, "race"))
        except FinetuneExists as exc:
            results.append(exc)

    threads = [threading.Thread(target=create) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    winners = [r for r in results if isinstance(r, Finetune)]
    assert len(winners) == 1 and len(results) == 8
    assert store.list() == winners and store.check() == []


@pytest.mark.parametrize("name", ["", "../x", "a/b", ".hidden", "x" * 129, " ", "a b", "tab\t", "é", None])
def test_bad_names_are_refused(store, name):
    store.create(MODEL, "kept")
    error = assert_refused(store, FinetuneError, "letters, digits", store.create, MODEL, name)
    assert repr(name) in str(error) and not isinstance(error, AssetError)


def test_a_name_shaped_like_an_id_is_refused(store):
    other = store.create(MODEL, "first")
    for name in (other.id, str(uuid.uuid4()).upper()):
        error = assert_refused(store, FinetuneError, "form of a fine-tune id", store.create, MODEL, name)
        assert repr(name) in str(error)
    assert store.get(other.id).name == "first"


def test_longest_and_dotted_names_are_accepted(store):
    for name in ("x" * 128, "gemma-2b.v1_final", "0"):
        assert store.get(store.create(MODEL, name).id).name == name


@pytest.mark.parametrize("fields, match", [
    ({"model": ""}, "model ''"),
    ({"model": "   "}, "model"),
    ({"description": "d" * 1025}, "1025 characters"),
    ({"description": None}, "description None"),
    ({"public": "yes"}, "public 'yes'"),
])
def test_bad_fields_are_refused(store, fields, match):
    arguments = {"model": MODEL, "name": "ok", **fields}
    assert_refused(store, FinetuneError, match, lambda: store.create(**arguments))
    assert store.create(MODEL, "ok", description="d" * 1024).description == "d" * 1024


# --- assets ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("order", [ASSET_NAMES, ASSET_NAMES[::-1]])
def test_both_assets_make_a_complete_fine_tune(store, base, order):
    finetune = store.create(MODEL, "full")
    for file_name in order:
        finetune = store.add_asset("full", file_name, fixture_bytes(file_name))
    assert finetune.complete and finetune.files == ASSET_NAMES and finetune.missing() == []
    for file_name in ASSET_NAMES:
        assert (finetune.path / file_name).read_bytes() == fixture_bytes(file_name)
    assert finetune.modified_at >= finetune.created_at
    assert store.check() == [] and list(store.tmp_dir.iterdir()) == []
    check_adapter_files(finetune.path, base)  # and the stored pair passes the full check


def test_assets_stream_from_file_objects_in_chunks(store, monkeypatch):
    from mlx_gemma.lora import store as store_module
    monkeypatch.setattr(store_module, "UPLOAD_CHUNK_BYTES", 1000)  # many chunks for a small file
    store.create(MODEL, "streamed")
    with (ADAPTER / WEIGHTS).open("rb") as source:
        finetune = store.add_asset("streamed", WEIGHTS, source)
    assert (finetune.path / WEIGHTS).read_bytes() == fixture_bytes(WEIGHTS)


def test_replacing_an_asset_swaps_it_and_bumps_modified_at(store):
    finetune = store.create(MODEL, "swap")
    first = store.add_asset(finetune.id, CONFIG, fixture_bytes(CONFIG))
    second = store.add_asset(finetune.id, CONFIG, config_bytes(lora_alpha=32))
    assert json.loads((second.path / CONFIG).read_bytes())["lora_alpha"] == 32
    assert second.modified_at > first.modified_at >= finetune.created_at
    assert second.created_at == finetune.created_at and store.check() == []


def test_modified_at_moves_on_when_the_clock_is_set_back(store, monkeypatch):
    """The server serves a fine-tune's newest files by modified_at: a clock set back between two
    uploads (NTP, a resumed VM) must not make the new upload sort before the old one."""
    from mlx_gemma.lora import store as store_module
    finetune = store.create(MODEL, "clock")
    first = store.add_asset(finetune.id, CONFIG, fixture_bytes(CONFIG))
    monkeypatch.setattr(store_module, "_now", lambda: "2020-01-01T00:00:00.000000Z")
    second = store.add_asset(finetune.id, CONFIG, config_bytes(lora_alpha=32))
    last = datetime.strptime(first.modified_at, "%Y-%m-%dT%H:%M:%S.%fZ")
    assert datetime.strptime(second.modified_at, "%Y-%m-%dT%H:%M:%S.%fZ") - last == timedelta(microseconds=1)
    third = store.add_asset(finetune.id, CONFIG, fixture_bytes(CONFIG))
    assert third.modified_at > second.modified_at > first.modified_at


def test_wrong_file_name_is_refused(store):
    store.create(MODEL, "named")
    for file_name in ("adapter_model.bin", "../adapter_config.json", "adapters.safetensors"):
        error = assert_refused(store, AssetError, "is not an asset", store.add_asset, "named", file_name, b"{}")
        assert repr(file_name) in str(error) and all(name in str(error) for name in ASSET_NAMES)


def test_unknown_fine_tune_is_refused(store):
    assert_refused(store, FinetuneNotFound, "'nobody'", store.add_asset, "nobody", CONFIG, fixture_bytes(CONFIG))


def test_empty_upload_is_refused(store):
    store.create(MODEL, "empty")
    assert_refused(store, AssetError, "adapter_config.json is empty", store.add_asset, "empty", CONFIG, b"")
    assert_refused(store, AssetError, "is empty", store.add_asset, "empty", WEIGHTS, io.BytesIO(b""))


def random_bytes() -> bytes:
    return np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()


def header_longer_than_file() -> bytes:
    return struct.pack("<Q", 10_000) + b'{"a": 1}'


def bad_dtype(tmp_path: Path) -> bytes:
    tensors = load_file(str(ADAPTER / WEIGHTS))
    return safetensors_bytes(tmp_path, {k: v.astype(np.float64) for k, v in tensors.items()})


def offsets_past_the_data() -> bytes:
    header = json.dumps({"m.q_proj.lora_A.weight": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}})
    return struct.pack("<Q", len(header)) + header.encode() + b"\0" * 8


def not_lora_keys(tmp_path: Path) -> bytes:
    return safetensors_bytes(tmp_path, {"model.embed_tokens.weight": np.zeros((4, 4), np.float32)})


CORRUPT_WEIGHTS = {
    "random bytes": (lambda tmp: random_bytes(), "not a valid safetensors file"),
    "header longer than the file": (lambda tmp: header_longer_than_file(), "header length 10000"),
    "too short": (lambda tmp: b"\x01\x02", "header length -1"),
    "header not JSON": (lambda tmp: struct.pack("<Q", 4) + b"\xff\xfe{[", "not UTF-8 JSON"),
    "float64": (bad_dtype, "dtype 'F64'"),
    "offsets past the data": (lambda tmp: offsets_past_the_data(), "do not tile"),
    "not LoRA keys": (not_lora_keys, "not a LoRA A/B weight"),
}


@pytest.mark.parametrize("case", CORRUPT_WEIGHTS)
@pytest.mark.parametrize("which", ["bare_store", "store"])
def test_corrupt_safetensors_are_refused(request, tmp_path, which, case):
    store = request.getfixturevalue(which)
    build, match = CORRUPT_WEIGHTS[case]
    store.create(MODEL, "corrupt")
    error = assert_refused(store, AssetError, match, store.add_asset, "corrupt", WEIGHTS, build(tmp_path))
    assert "'corrupt'" in str(error) and isinstance(error.__cause__, AdapterError)


def test_corrupt_safetensors_are_refused_next_to_a_config(store):
    store.create(MODEL, "paired")
    store.add_asset("paired", CONFIG, fixture_bytes(CONFIG))
    assert_refused(store, AssetError, "not a valid safetensors file", store.add_asset, "paired", WEIGHTS,
                   random_bytes())


@pytest.mark.parametrize("content, match", [
    (b"not json", "not valid JSON"),
    (b"[1, 2]", "must hold a JSON object"),
    (config_bytes(use_dora=True), "DoRA adapters are not served"),
    (config_bytes(bias="all"), "bias 'all'"),
    (config_bytes(model_type="llama"), "model_type 'llama'"),
    # values the math reads: named at the config's upload, not a crash when the weights arrive
    (config_bytes(r=0), "r 0 is refused: the rank must be a whole number >= 1"),
    (config_bytes(r="four"), "r 'four' is refused"),
    (config_bytes(lora_alpha=None), "lora_alpha None is refused: give a finite number"),
    (config_bytes(rank_pattern=["q_proj"]), "rank_pattern ['q_proj'] is refused"),
    (config_bytes(alpha_pattern={"q_proj": "big"}), "alpha_pattern entries {'q_proj': 'big'} are refused"),
    (config_bytes(target_modules="(("), "target_modules '((' is refused"),
    (config_bytes(target_modules=5), "target_modules 5 is refused"),
    (config_bytes(layers_to_transform="1"), "layers_to_transform '1' is refused"),
    (config_bytes(use_rslora="yes"), "use_rslora 'yes' is refused"),
    # PEFT features that change the math beyond W x + s B A x
    (config_bytes(alora_invocation_tokens=[5, 6]), "alora_invocation_tokens [5, 6] is refused: activated LoRA"),
    (config_bytes(layer_replication=[[0, 1], [0, 1]]), "layer_replication [[0, 1], [0, 1]] is refused"),
    (config_bytes(init_lora_weights="pissa_niter_4"), "init_lora_weights 'pissa_niter_4' is refused"),
    (config_bytes(init_lora_weights="olora"), "path_initial_model_for_weight_conversion"),
    (config_bytes(lora_bias=True), "lora_bias True is refused"),
])
def test_bad_configs_are_refused(store, content, match):
    store.create(MODEL, "configured")
    assert_refused(store, AssetError, re.escape(match), store.add_asset, "configured", CONFIG, content)


def test_dora_is_refused_without_a_base_too(bare_store):
    bare_store.create(MODEL, "dora")
    assert_refused(bare_store, AssetError, "DoRA", bare_store.add_asset, "dora", CONFIG, config_bytes(use_dora=True))


def test_config_whose_rank_does_not_fit_the_weights_is_refused(store):
    store.create(MODEL, "rank")
    store.add_asset("rank", WEIGHTS, fixture_bytes(WEIGHTS))
    assert_refused(store, AssetError, "do not fit the base layer", store.add_asset, "rank", CONFIG,
                   config_bytes(r=4))
    assert_refused(store, AssetError, re.escape(
        "The file is valid alone but does not match the fine-tune's adapter_model.safetensors: to change the "
        "rank or the target modules, create a new fine-tune with both new files (or delete this one first)"),
        store.add_asset, "rank", CONFIG, config_bytes(r=4))


def test_weights_whose_shapes_do_not_fit_the_base_are_refused(store, tmp_path):
    store.create(MODEL, "shapes")
    store.add_asset("shapes", CONFIG, fixture_bytes(CONFIG))
    assert_refused(store, AssetError, "q_proj: shapes", store.add_asset, "shapes", WEIGHTS,
                   wrong_shape_weights(tmp_path))
    assert_refused(store, AssetError, re.escape(  # not "does not match the fine-tune's config": it does
        "The files agree with each other: the adapter was trained for another base model than the one this "
        "server runs"), store.add_asset, "shapes", WEIGHTS, wrong_shape_weights(tmp_path))


def test_a_good_pair_stays_when_a_bad_replacement_is_refused(store, tmp_path):
    store.create(MODEL, "stable")
    for file_name in ASSET_NAMES:
        store.add_asset("stable", file_name, fixture_bytes(file_name))
    assert_refused(store, AssetError, "refused", store.add_asset, "stable", WEIGHTS, wrong_shape_weights(tmp_path))
    assert_refused(store, AssetError, "refused", store.add_asset, "stable", CONFIG, config_bytes(r=16))
    assert store.get("stable").complete


def test_too_large_is_refused(tmp_path):
    store = FinetuneStore(tmp_path / "small", max_file_bytes=100)
    store.create(MODEL, "big")
    error = assert_refused(store, AssetTooLarge, "over the limit of 100 bytes", store.add_asset, "big", WEIGHTS,
                           io.BytesIO(fixture_bytes(WEIGHTS)))
    assert isinstance(error, AssetError)
    assert_refused(store, AssetTooLarge, "max_file_bytes", store.add_asset, "big", CONFIG, b"{" + b" " * 100 + b"}")
    assert store.add_asset("big", CONFIG, b'{"r": 8}').files == (CONFIG,)  # under the limit: accepted


class VanishingClient(io.RawIOBase):
    """A source that sends some bytes, then fails as a dropped connection does."""

    def __init__(self, data: bytes, fail_after: int):
        self.data, self.fail_after, self.sent = data, fail_after, 0

    def read(self, size: int = -1) -> bytes:
        if self.sent >= self.fail_after:
            raise ConnectionResetError("client went away")
        chunk = self.data[self.sent:self.sent + min(size, self.fail_after - self.sent)]
        self.sent += len(chunk)
        return chunk


def test_a_source_failing_mid_way_leaves_the_store_unchanged(store):
    store.create(MODEL, "dropped")
    store.add_asset("dropped", WEIGHTS, fixture_bytes(WEIGHTS))
    data = fixture_bytes(WEIGHTS)[::-1]
    assert_refused(store, ConnectionResetError, "went away", store.add_asset, "dropped", WEIGHTS,
                   VanishingClient(data, len(data) // 2))
    assert (store.get("dropped").path / WEIGHTS).read_bytes() == fixture_bytes(WEIGHTS)


def test_a_failing_validator_leaves_the_store_unchanged(tmp_path):
    def broken(staging: Path) -> None:
        raise RuntimeError("validator crashed")

    store = FinetuneStore(tmp_path / "broken", validate=broken)
    store.create(MODEL, "v")
    assert_refused(store, RuntimeError, "validator crashed", store.add_asset, "v", CONFIG, fixture_bytes(CONFIG))


def test_the_validator_sees_the_new_file_with_the_other_asset(tmp_path):
    seen = []
    store = FinetuneStore(tmp_path / "seen", validate=lambda d: seen.append(sorted(p.name for p in d.iterdir())))
    store.create(MODEL, "v")
    store.add_asset("v", CONFIG, fixture_bytes(CONFIG))
    store.add_asset("v", WEIGHTS, fixture_bytes(WEIGHTS))
    store.add_asset("v", CONFIG, fixture_bytes(CONFIG))
    assert seen == [[CONFIG], list(ASSET_NAMES), list(ASSET_NAMES)]


# --- persistence and recovery ------------------------------------------------------------------------------------


def test_reopening_lists_the_same_fine_tunes(store):
    store.create(MODEL, "one", public=True)
    store.add_asset("one", CONFIG, fixture_bytes(CONFIG))
    store.create(MODEL, "two", description="second")
    reopened = FinetuneStore(store.data_dir)
    assert reopened.list() == store.list() and snapshot(reopened) == snapshot(store)
    assert reopened.check() == []


def test_reopening_recovers_from_a_killed_process(store):
    kept = store.create(MODEL, "kept")
    for file_name in ASSET_NAMES:
        store.add_asset("kept", file_name, fixture_bytes(file_name))
    (store.tmp_dir / "half.upload").write_bytes(b"partial")
    (store.tmp_dir / "x.staging").mkdir()
    (store.tmp_dir / "x.staging" / CONFIG).write_bytes(b"{}")
    orphan = store.finetunes_dir / "00000000-0000-4000-8000-000000000000"
    orphan.mkdir()
    (orphan / CONFIG).write_bytes(b"{}")
    (store.finetunes_dir / "stray-file").write_bytes(b"x")
    (kept.path / "adapter_model.safetensors.tmp").write_bytes(b"x")
    (kept.path / "sub").mkdir()
    problems = store.check()
    assert len(problems) == 6 and any("half.upload" in p for p in problems)
    reopened = FinetuneStore(store.data_dir)
    assert reopened.check() == [] and list(reopened.tmp_dir.iterdir()) == []
    assert not orphan.exists() and sorted(p.name for p in kept.path.iterdir()) == list(ASSET_NAMES)
    assert reopened.list() == [store.get("kept")] and reopened.get("kept").complete


def test_another_process_opening_the_store_leaves_uploads_in_progress_alone(store):
    """`mlx-gemma finetune list` beside a running server must not empty the server's tmp/."""
    store.create(MODEL, "kept")
    upload = store.tmp_dir / "in-progress.upload"
    upload.write_bytes(b"half of a file")
    listed = subprocess.run([sys.executable, "-m", "mlx_gemma", "finetune", "list", "--json",
                             "--data-dir", str(store.data_dir)], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert listed.returncode == 0, listed.stderr
    assert [row["name"] for row in json.loads(listed.stdout)] == ["kept"]
    assert upload.read_bytes() == b"half of a file"


def test_threads_uploading_to_their_own_fine_tunes(store):
    def work(index: int) -> None:
        store.create(MODEL, f"t{index}")
        for file_name in ASSET_NAMES:
            store.add_asset(f"t{index}", file_name, io.BytesIO(fixture_bytes(file_name)))
        store.list()

    threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(f.name for f in store.list() if f.complete) == [f"t{i}" for i in range(6)]
    assert store.check() == []


CHURN = """
import sys
from pathlib import Path
from mlx_gemma.lora.store import FinetuneStore
adapter, store = Path(sys.argv[1]), FinetuneStore(sys.argv[2])
print("ready", flush=True)
for index in range(10**6):
    store.create("m", f"n{index}")
    for file_name in ("adapter_config.json", "adapter_model.safetensors"):
        store.add_asset(f"n{index}", file_name, (adapter / file_name).read_bytes())
    if index % 2:
        store.delete(f"n{index}")
"""


@pytest.mark.parametrize("delay", [0.05, 0.3, 0.7])
def test_sigkill_at_any_moment_leaves_a_recoverable_store(tmp_path, delay):
    data_dir = tmp_path / "killed"
    child = subprocess.Popen([sys.executable, "-c", CHURN, str(ADAPTER), str(data_dir)], stdout=subprocess.PIPE,
                             env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert child.stdout.readline().strip() == b"ready"
    time.sleep(delay)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    reopened = FinetuneStore(data_dir)
    assert reopened.check() == []
    finetunes = reopened.list()
    assert all(f.name.startswith("n") and (f.complete or f == finetunes[-1]) for f in finetunes)
    for finetune in finetunes:
        for file_name in finetune.files:
            assert (finetune.path / file_name).read_bytes() == fixture_bytes(file_name)


def test_recovery_never_deletes_a_row(store):
    finetune = store.create(MODEL, "dirless")
    os.rmdir(finetune.path)
    reopened = FinetuneStore(store.data_dir)
    assert reopened.get("dirless").files == ()
    assert reopened.check() == [f"fine-tune {finetune.id} has no directory {finetune.path}"]
    reopened.add_asset("dirless", CONFIG, fixture_bytes(CONFIG))  # an upload repairs it
    assert reopened.check() == []


def test_the_database_is_one_table_with_a_unique_name(store):
    import sqlite3
    with sqlite3.connect(store.data_dir / "finetunes.sqlite3") as conn:
        tables = [row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        columns = [row[1] for row in conn.execute("PRAGMA table_info(finetunes)")]
    assert tables == ["finetunes"] and set(columns) == FIELDS


# --- check_adapter_files on its own ------------------------------------------------------------------------------


def test_check_adapter_files_accepts_the_fixture_with_and_without_a_base(base):
    check_adapter_files(ADAPTER, base)
    check_adapter_files(ADAPTER)


@pytest.mark.parametrize("present", [(CONFIG,), (WEIGHTS,)])
def test_check_adapter_files_accepts_one_file(tmp_path, base, present):
    for file_name in present:
        (tmp_path / file_name).write_bytes(fixture_bytes(file_name))
    check_adapter_files(tmp_path, base)
    check_adapter_files(tmp_path)


def test_check_adapter_files_refuses_an_empty_or_missing_directory(tmp_path):
    with pytest.raises(AdapterError, match="neither adapter_config.json nor adapter_model.safetensors"):
        check_adapter_files(tmp_path)
    with pytest.raises(AdapterError, match="no such directory"):
        check_adapter_files(tmp_path / "missing")


def test_check_adapter_files_lists_every_problem(tmp_path):
    (tmp_path / CONFIG).write_bytes(config_bytes(use_dora=True, bias="all"))
    (tmp_path / WEIGHTS).write_bytes(random_bytes())
    with pytest.raises(AdapterError) as info:
        check_adapter_files(tmp_path)
    assert len(info.value.problems) == 3


def test_check_adapter_files_size_limit(tmp_path):
    from mlx_gemma.lora.adapters import AdapterLimits
    (tmp_path / WEIGHTS).write_bytes(fixture_bytes(WEIGHTS))
    with pytest.raises(AdapterError, match="over the limit of 1000"):
        check_adapter_files(tmp_path, limits=AdapterLimits(max_file_bytes=1000))
