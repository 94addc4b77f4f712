"""Hostile adapter uploads and a tampered data directory: refused, and nothing written outside.

Over HTTP: path-like fine-tune names and file names, safetensors files with oversized or lying
headers, wrong dtypes, NaN/Inf weights and huge declared shapes each get 400 and the Workers AI
envelope whose message names the bad value. On disk: symbolic links planted in the data
directory (an asset, a fine-tune's directory, tmp/, finetunes/) are never followed: linked files
count as absent, uploads never write through a link, and reopening the store removes the link,
never its target. A directory beside the data directory is compared byte for byte throughout.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import mlx_gemma
from mlx_gemma.lora.store import FinetuneError, FinetuneStore
from mlx_gemma.server.app import build_app
from mlx_gemma.server.service import Service, Settings

from conftest import FIXTURES

from .support import ASSETS, FINETUNES_PATH, MODEL, RUN_PATH, live_server, workers_ai_error
from .tally import count

ADAPTER = FIXTURES / "adapters" / "all7_r8"
CONFIG, WEIGHTS = ASSETS
A_KEY = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"


def tree(path: Path) -> dict[str, bytes | str]:
    """Every entry under `path`: file bytes, or "dir"/"link -> target"."""
    entries: dict[str, bytes | str] = {}
    for entry in sorted(path.rglob("*")):
        key = str(entry.relative_to(path))
        entries[key] = (f"link -> {entry.readlink()}" if entry.is_symlink() else
                        "dir" if entry.is_dir() else entry.read_bytes())
    return entries


class Site:
    """A live server over a data directory, and a directory beside it that nothing may touch."""

    def __init__(self, root: Path, runtime: mlx_gemma.Runtime, url: str, service: Service):
        self.root, self.runtime, self.service = root, runtime, service
        self.data_dir, self.outside = root / "data", root / "outside"
        self.http = httpx.Client(base_url=url, timeout=30)

    def create(self, name: str) -> dict:
        response = self.http.post(FINETUNES_PATH, json={"model": MODEL, "name": name})
        assert response.status_code == 200, response.text
        return response.json()["result"]

    def upload(self, name: str, file_name: str, content: bytes, filename: str | None = None) -> httpx.Response:
        return self.http.post(f"{FINETUNES_PATH}/{name}/finetune-assets", data={"file_name": file_name},
                              files={"file": (filename or file_name, content)})

    def files(self, name: str) -> list[str]:
        return self.http.get(f"{FINETUNES_PATH}/{name}").json()["result"]["files"]

    def refused(self, response: httpx.Response, status: int, code: int, *fragments: str) -> str:
        message = workers_ai_error(response, status, code)
        assert all(fragment in message for fragment in fragments), message
        count("hostile")
        return message


def fill_outside(outside: Path) -> None:
    """What planted links point at: a weights file, an adapter directory, a scratch directory."""
    (outside / "adapter").mkdir(parents=True)
    (outside / "scratch").mkdir()
    (outside / "keep.txt").write_bytes(b"not the store's")
    (outside / "scratch" / "precious.txt").write_bytes(b"keep me")
    (outside / "adapter" / "notes.txt").write_bytes(b"mine")
    for file_name in ASSETS:
        (outside / file_name).write_bytes((ADAPTER / file_name).read_bytes())
        (outside / "adapter" / file_name).write_bytes((ADAPTER / file_name).read_bytes())


@pytest.fixture(scope="module")
def site(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    root = tmp_path_factory.mktemp("hostile")
    fill_outside(root / "outside")
    runtime = mlx_gemma.load(tiny_dir)
    app = build_app(runtime, Settings(data_dir=root / "data"))
    with live_server(app) as url:
        test_site = Site(root, runtime, url, app.state.service)
        test_site.create("hostile")
        yield test_site
        test_site.http.close()


@pytest.fixture()
def untouched_outside(site: Site) -> Iterator[None]:
    """The directory beside the data directory, and the data directory's parent, stay as they were."""
    before, siblings = tree(site.outside), sorted(p.name for p in site.root.iterdir())
    yield
    assert tree(site.outside) == before
    assert sorted(p.name for p in site.root.iterdir()) == siblings


# --- names ---------------------------------------------------------------------------------------------------------

PATH_LIKE = ["../x", "..", ".", "a/b", "/etc/passwd", "..\\x", "x/../../y", "~root", "%2e%2e", "../" * 40 + "x",
             "name\x00.txt", "outside/keep.txt", "C:\\Windows"]


@pytest.mark.parametrize("name", PATH_LIKE)
def test_path_like_finetune_names_are_refused(site: Site, untouched_outside: None, name: str) -> None:
    response = site.http.post(FINETUNES_PATH, json={"model": MODEL, "name": name})
    site.refused(response, 400, 5006, f"fine-tune name {name!r} is refused")
    assert [f.name for f in site.service.store.list()] == ["hostile"]


@pytest.mark.parametrize("file_name", ["../adapter_config.json", "../../x", "/etc/passwd", "adapter_config.json/..",
                                       "finetunes/../adapter_config.json", "..", "adapter_model.safetensors\x00.txt",
                                       "./adapter_config.json", "../outside/keep.txt"])
def test_path_like_file_names_are_refused(site: Site, untouched_outside: None, file_name: str) -> None:
    response = site.upload("hostile", file_name, b'{"r": 8}')
    site.refused(response, 400, 5006, f"file_name {file_name!r} is not an asset")
    assert site.files("hostile") == []


def test_a_path_like_multipart_filename_is_ignored(site: Site, untouched_outside: None) -> None:
    response = site.upload("hostile", CONFIG, (ADAPTER / CONFIG).read_bytes(), filename="../../outside/keep.txt")
    assert response.status_code == 200 and response.json()["result"]["files"] == [CONFIG]
    finetune = site.service.store.get("hostile")
    assert sorted(p.name for p in finetune.path.iterdir()) == [CONFIG]


@pytest.mark.parametrize("segment, code", [("..%2F..%2Foutside", 7000), ("%2e%2e", 3037), ("..%5Cx", 3037)])
def test_path_like_finetunes_in_the_url_are_not_found(site: Site, untouched_outside: None, segment: str,
                                                      code: int) -> None:
    response = site.http.post(f"{FINETUNES_PATH}/{segment}/finetune-assets", data={"file_name": CONFIG},
                              files={"file": (CONFIG, b"{}")})
    site.refused(response, 404, code, "Not Found" if code == 7000 else "Finetune not found")


# --- hostile safetensors -------------------------------------------------------------------------------------------

def safetensors(header: dict, data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def with_values(tmp_path: Path, value: float) -> bytes:
    tensors = load_file(str(ADAPTER / WEIGHTS))
    tensors[A_KEY] = tensors[A_KEY].copy()
    tensors[A_KEY][0, 0] = value
    save_file(tensors, str(tmp_path / "w.safetensors"))
    return (tmp_path / "w.safetensors").read_bytes()


def with_dtype(tmp_path: Path, dtype: type) -> bytes:
    tensors = {key: value.astype(dtype) for key, value in load_file(str(ADAPTER / WEIGHTS)).items()}
    save_file(tensors, str(tmp_path / "w.safetensors"))
    return (tmp_path / "w.safetensors").read_bytes()


def declared(shape: list[int], nbytes: int) -> bytes:
    return safetensors({A_KEY: {"dtype": "F32", "shape": shape, "data_offsets": [0, nbytes]}}, b"\0" * nbytes)


HOSTILE_WEIGHTS = {
    "header length 2**63": (lambda tmp: struct.pack("<Q", 2**63) + b"{}", "header length 9223372036854775808"),
    "header of 150 MB declared": (lambda tmp: struct.pack("<Q", 150_000_000) + b"{}" * 50, "header length 150000000"),
    "header longer than the file": (lambda tmp: struct.pack("<Q", 4096) + b"{}" * 50, "header length 4096"),
    "int32 weights": (lambda tmp: with_dtype(tmp, np.int32), "dtype 'I32'"),
    "uint8 weights": (lambda tmp: with_dtype(tmp, np.uint8), "dtype 'U8'"),
    "bool weights": (lambda tmp: with_dtype(tmp, np.bool_), "dtype 'BOOL'"),
    "float64 weights": (lambda tmp: with_dtype(tmp, np.float64), "dtype 'F64'"),
    "NaN weights": (lambda tmp: with_values(tmp, float("nan")), "q_proj: weights hold NaN or infinite values"),
    "infinite weights": (lambda tmp: with_values(tmp, float("inf")), "q_proj: weights hold NaN or infinite values"),
    "shape wrapping 32 bits": (lambda tmp: declared([2**32 + 64, 8], 2048), "not the 137438955520 its shape needs"),
    "shape of 2**126 bytes": (lambda tmp: declared([2**62, 2**62], 16), f"not the {2**126} its shape needs"),
    "negative shape": (lambda tmp: declared([-1, 8], 32), "has shape [-1, 8]"),
    "one-dimensional": (lambda tmp: declared([64], 256), "has shape [64]: a LoRA weight is a 2-D list"),
    "offsets past the data": (lambda tmp: declared([8, 64], 2048)[:-8], "do not tile the 2040 data bytes"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_WEIGHTS))
def test_hostile_weights_are_refused(site: Site, untouched_outside: None, tmp_path: Path, case: str) -> None:
    build, fragment = HOSTILE_WEIGHTS[case]
    assert site.upload("hostile", CONFIG, (ADAPTER / CONFIG).read_bytes()).status_code == 200
    before = site.service.store.get("hostile")
    response = site.upload("hostile", WEIGHTS, build(tmp_path))
    site.refused(response, 400, 5006, f"{WEIGHTS} for fine-tune 'hostile' refused: ", fragment)
    assert site.service.store.get("hostile") == before and site.service.store.check() == []
    site.refused(site.http.post(RUN_PATH, json={"prompt": "Hi", "lora": "hostile"}), 400, 3039, WEIGHTS)


# --- symbolic links in the data directory -----------------------------------------------------------------------

def plant_link(link: Path, target: Path) -> None:
    if link.is_dir() and not link.is_symlink():
        for entry in link.iterdir():
            entry.unlink()
        link.rmdir()
    link.symlink_to(target)


def test_a_linked_asset_counts_as_absent_and_is_replaced_not_written_through(site: Site,
                                                                            untouched_outside: None) -> None:
    finetune = site.create("linked-asset")
    assert site.upload("linked-asset", CONFIG, (ADAPTER / CONFIG).read_bytes()).status_code == 200
    plant_link(site.data_dir / "finetunes" / finetune["id"] / WEIGHTS, site.outside / WEIGHTS)
    assert site.files("linked-asset") == [CONFIG]
    site.refused(site.http.post(RUN_PATH, json={"prompt": "Hi", "lora": "linked-asset"}), 400, 3039,
                 "'linked-asset' is missing adapter_model.safetensors")
    assert site.upload("linked-asset", WEIGHTS, (ADAPTER / WEIGHTS).read_bytes()).status_code == 200
    assert site.service.store.check() == []
    assert not (site.data_dir / "finetunes" / finetune["id"] / WEIGHTS).is_symlink()


def test_a_linked_finetune_directory_is_never_followed(site: Site, untouched_outside: None) -> None:
    finetune = site.create("linked-dir")
    plant_link(site.data_dir / "finetunes" / finetune["id"], site.outside / "adapter")
    site.refused(site.http.post(RUN_PATH, json={"prompt": "Hi", "lora": "linked-dir"}), 400, 3039,
                 "missing adapter_config.json and adapter_model.safetensors")
    site.refused(site.upload("linked-dir", CONFIG, (ADAPTER / CONFIG).read_bytes()), 400, 5006,
                 f"its directory finetunes/{finetune['id']} is a symbolic link")
    assert site.service.store.check() == [f"{site.data_dir / 'finetunes' / finetune['id']} is a symbolic link"]
    reopened = FinetuneStore(site.data_dir)
    assert not (site.data_dir / "finetunes" / finetune["id"]).exists()
    reopened.add_asset("linked-dir", CONFIG, (ADAPTER / CONFIG).read_bytes())  # an upload repairs it
    assert reopened.check() == []


def test_a_linked_tmp_is_replaced_and_its_target_kept(site: Site, untouched_outside: None) -> None:
    (site.data_dir / "tmp").rmdir()
    (site.data_dir / "tmp").symlink_to(site.outside / "scratch")
    reopened = FinetuneStore(site.data_dir)
    assert not reopened.tmp_dir.is_symlink() and reopened.tmp_dir.is_dir() and reopened.check() == []
    count("hostile")


def test_a_linked_finetunes_directory_is_refused_at_open(tmp_path: Path) -> None:
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "precious.txt").write_bytes(b"keep me")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "finetunes").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(FinetuneError, match="finetunes is a symbolic link: the store deletes what it does not know"):
        FinetuneStore(tmp_path / "data")
    assert tree(tmp_path / "elsewhere") == {"precious.txt": b"keep me"}
    count("hostile")
