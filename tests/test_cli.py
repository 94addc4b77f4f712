"""`mlx-gemma generate`: streams the same text as the Python API; bad values exit non-zero."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def cli(*args: str, cwd=None, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mlx_gemma", *args], capture_output=True, text=True, timeout=120,
                          cwd=cwd, env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})


def test_generate_prints_the_api_text(tiny_dir, runtime):
    done = cli("generate", "--model", str(tiny_dir), "--prompt", "Water boils at", "--raw",
               "--temperature", "0", "--max-tokens", "10")
    assert done.returncode == 0, done.stderr
    expected = runtime.generate(prompt="Water boils at", raw=True, temperature=0, max_tokens=10).text
    assert done.stdout == expected + "\n"
    assert "tokens/s" in done.stderr


def test_generate_messages_and_sampling_flags(tiny_dir, runtime):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]
    flags = dict(temperature=1.2, top_p=0.9, top_k=20, seed=42, repetition_penalty=1.1,
                 frequency_penalty=0.5, presence_penalty=0.5, max_tokens=12)
    args = [f"--{k.replace('_', '-')}={v}" for k, v in flags.items()]
    done = cli("generate", "--model", str(tiny_dir), "--messages", json.dumps(messages), *args)
    assert done.returncode == 0, done.stderr
    assert done.stdout == runtime.generate(messages=messages, **flags).text + "\n"


@pytest.mark.parametrize("args, message", [
    (["--prompt", "x", "--temperature", "9"], "--temperature 9.0 is out of range: use a number from 0 to 5"),
    (["--prompt", "x", "--top-k", "0"], "--top-k 0 is out of range: use an integer from 1 to 50"),
    (["--prompt", ""], "prompt is empty"),
    (["--messages", "[not json"], "--messages is not valid JSON"),
])
def test_bad_values_exit_non_zero(tiny_dir, args, message):
    done = cli("generate", "--model", str(tiny_dir), *args)
    assert done.returncode == 2
    assert message in done.stderr


def test_unknown_model_path_exits_non_zero():
    done = cli("generate", "--model", "/no/such/model", "--prompt", "x")
    assert done.returncode == 2 and "no model directory at '/no/such/model'" in done.stderr


def test_prompt_and_messages_together_are_refused(tiny_dir):
    done = cli("generate", "--model", str(tiny_dir), "--prompt", "x", "--messages", "[]")
    assert done.returncode == 2 and "not allowed with argument" in done.stderr


ADAPTER = "tests/fixtures/adapters/all7_r8"


def test_generate_with_adapter_and_fused(tiny_dir):
    import mlx_gemma

    runtime = mlx_gemma.load(tiny_dir, adapters={"all7_r8": ADAPTER})
    expected = runtime.generate(prompt="Water boils at", raw=True, temperature=0, max_tokens=8, lora="all7_r8").text
    common = ["generate", "--model", str(tiny_dir), "--prompt", "Water boils at", "--raw", "--temperature", "0",
              "--max-tokens", "8", "--adapter", ADAPTER]
    for extra in ([], ["--fuse"]):
        done = cli(*common, *extra)
        assert done.returncode == 0, done.stderr
        assert done.stdout == expected + "\n"


def test_fuse_writes_a_plain_checkpoint(tiny_dir, tmp_path):
    import numpy as np
    import mlx_gemma

    done = cli("fuse", "--model", str(tiny_dir), "--adapter", ADAPTER, "--out", str(tmp_path / "fused"))
    assert done.returncode == 0, done.stderr
    assert "fused into" in done.stdout and "dense float32" in done.stdout
    fused = mlx_gemma.load(tmp_path / "fused")
    reference = np.load(f"{ADAPTER}/reference_logits.npz")
    np.testing.assert_allclose(fused.logits(reference["ids_0"].tolist()), reference["logits_0"], atol=1e-4)


def test_fuse_keeps_the_chat_template_file(tiny_dir, tmp_path):
    """transformers and mlx-lm now save the template as chat_template.jinja: a fused copy keeps it."""
    model = tmp_path / "model"
    shutil.copytree(tiny_dir, model)
    template = "{% for message in messages %}{{ message['content'] }}{% endfor %}"
    (model / "chat_template.jinja").write_text(template)
    done = cli("fuse", "--model", str(model), "--adapter", ADAPTER, "--out", str(tmp_path / "fused"))
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "fused" / "chat_template.jinja").read_text() == template


def test_fuse_refuses_quantize_before_loading(tmp_path):
    done = cli("fuse", "--model", "/no/such/model", "--adapter", ADAPTER, "--out", str(tmp_path / "f"),
               "--quantize", "4")
    assert done.returncode == 2 and not (tmp_path / "f").exists()
    assert done.stderr == ("mlx-gemma: error: --quantize 4: fuse writes dense weights, so quantizing the base first "
                           "would only add its rounding error to them; fuse without it, then quantize the result "
                           "(mlx-gemma serve --model OUT --quantize 4, or mlx_lm.convert -q)\n")


def test_serve_refuses_an_adapter_name_given_twice_before_loading():
    done = cli("serve", "--model", "/no/such/model", "--adapter", f"sql={ADAPTER}", "--adapter", f"sql={ADAPTER}")
    assert done.returncode == 2
    assert done.stderr == "mlx-gemma: error: --adapter sql= is given twice: give each adapter its own name\n"


def test_messages_file_with_a_byte_order_mark_is_read(tiny_dir, tmp_path):
    messages = tmp_path / "messages.json"
    messages.write_text('[{"role": "user", "content": "Hi"}]', encoding="utf-8-sig")
    done = cli("generate", "--model", str(tiny_dir), "--messages", f"@{messages}", "--max-tokens", "2")
    assert done.returncode == 0, done.stderr


def test_a_corrupt_fine_tune_database_is_one_line(tmp_path):
    (tmp_path / "finetunes.sqlite3").write_bytes(b"this is not a database" * 100)
    done = cli("finetune", "list", "--data-dir", str(tmp_path))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.startswith(f"mlx-gemma: error: {tmp_path / 'finetunes.sqlite3'} cannot be used as the "
                                  "fine-tune database (file is not a database): move it aside")


def test_fuse_refuses_a_directory_that_holds_files_and_leaves_it_as_it_was(tiny_dir, tmp_path):
    """Old shards or an index beside the new weights would be what a loader reads."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.safetensors.index.json").write_text("{}")
    done = cli("fuse", "--model", str(tiny_dir), "--adapter", ADAPTER, "--out", str(out))
    assert done.returncode == 2 and done.stderr == (
        f"mlx-gemma: error: {out} already exists and is not empty: a checkpoint is written whole into a new or "
        "empty directory; pass another path (or remove that one)\n")
    assert [p.name for p in out.iterdir()] == ["model.safetensors.index.json"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli("fuse", "--model", str(tiny_dir), "--adapter", ADAPTER, "--out", str(empty)).returncode == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "out"]  # nothing left beside them
    assert (empty / "model.safetensors").is_file()


def test_bad_adapter_exits_non_zero(tiny_dir, tmp_path):
    done = cli("generate", "--model", str(tiny_dir), "--prompt", "x", "--adapter", str(tmp_path))
    assert done.returncode == 2 and "refused: " in done.stderr and "no adapter_config.json" in done.stderr
    done = cli("generate", "--model", str(tiny_dir), "--prompt", "x", "--fuse")
    assert done.returncode == 2 and "--fuse needs --adapter PATH" in done.stderr


def test_finetune_create_list_delete(tmp_path):
    from conftest import FIXTURES

    store = ["--data-dir", str(tmp_path)]
    created = cli("finetune", "create", "@cf/google/gemma-2b-it-lora", "sql", str(FIXTURES / "adapters" / "all7_r8"),
                  "--description", "SQL helper", *store)
    assert created.returncode == 0, created.stderr
    assert created.stdout.startswith("created fine-tune sql (")
    listed = json.loads(cli("finetune", "list", "--json", *store).stdout)
    assert [(f["name"], f["model"], f["description"], f["public"]) for f in listed] == [
        ("sql", "@cf/google/gemma-2b-it-lora", "SQL helper", False)]
    assert listed[0]["id"] in cli("finetune", "list", *store).stdout
    again = cli("finetune", "create", "@cf/google/gemma-2b-it-lora", "sql", str(FIXTURES / "adapters" / "all7_r8"), *store)
    assert again.returncode == 2 and "a fine-tune named 'sql' already exists" in again.stderr
    deleted = cli("finetune", "delete", "sql", *store)
    assert deleted.stdout == f"deleted fine-tune sql ({listed[0]['id']})\n"
    assert cli("finetune", "list", *store).stdout == "no fine-tunes\n"


def test_finetune_create_refuses_a_bad_folder_and_keeps_nothing(tmp_path):
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text('{"peft_type": "LORA", "use_dora": true}')
    store = ["--data-dir", str(tmp_path / "store")]
    missing = cli("finetune", "create", "@cf/google/gemma-2b-it-lora", "x", str(folder), *store)
    assert missing.returncode == 2 and "has no adapter_model.safetensors" in missing.stderr
    (folder / "adapter_model.safetensors").write_bytes(b"\x00" * 16)
    refused = cli("finetune", "create", "@cf/google/gemma-2b-it-lora", "x", str(folder), *store)
    assert refused.returncode == 2 and "DoRA" in refused.stderr
    assert cli("finetune", "list", *store).stdout == "no fine-tunes\n"
    _check_refused_alone(folder, store)
    other = cli("finetune", "create", "@cf/meta/llama-3-8b-instruct", "x", str(ROOT / ADAPTER),
                *store)
    assert other.returncode == 2 and other.stderr == (
        "mlx-gemma: error: model '@cf/meta/llama-3-8b-instruct' is not served here: fine-tunes are for "
        "@cf/google/gemma-2b-it-lora or @cf/google/gemma-7b-it-lora (the route's name, as the server and "
        "Workers AI take it)\n")
    assert cli("finetune", "list", *store).stdout == "no fine-tunes\n"


def _check_refused_alone(folder: Path, store: list[str]) -> None:
    """With no base model loaded, what the files alone show: another model family, a rank the weights lack."""
    shutil.copy(ROOT / ADAPTER / "adapter_model.safetensors", folder / "adapter_model.safetensors")
    config = json.loads((ROOT / ADAPTER / "adapter_config.json").read_text())
    for changes, message in (({"model_type": "llama"}, "model_type 'llama' is not a model family served here"),
                             ({"r": 4}, "lora_A has rank 8 where adapter_config.json says r=4")):
        (folder / "adapter_config.json").write_text(json.dumps({**config, **changes}))
        refused = cli("finetune", "create", "@cf/google/gemma-2b-it-lora", "x", str(folder), *store)
        assert refused.returncode == 2 and message in refused.stderr, refused.stderr
    assert cli("finetune", "list", *store).stdout == "no fine-tunes\n"


def test_serve_refuses_a_malformed_adapter_flag():
    done = cli("serve", "--model", "x", "--adapter", "no-equals-sign")
    assert done.returncode == 2 and "write NAME=PATH" in done.stderr


@pytest.mark.parametrize("args, message", [
    (["--temperature", "9"], "mlx-gemma: error: --temperature 9.0 is out of range: use a number from 0 to 5 "
                             "(0 means greedy)\n"),
    (["--max-tokens", "0", "--top-p", "3"], "mlx-gemma: error: --max-tokens 0 is out of range: use an integer >= 1; "
                                            "--top-p 3.0 is out of range: use a number from 0 to 2"),
])
def test_sampling_flags_are_checked_before_the_model_loads(args, message):
    done = cli("generate", "--model", "/no/such/model", "--prompt", "x", *args)
    assert done.returncode == 2 and done.stderr.startswith(message)


@pytest.mark.parametrize("args, message", [
    (["generate", "--messages", "@/nonexistent.json"], "argument --messages: cannot read '/nonexistent.json' "
     "(No such file or directory): pass an existing JSON file as @file.json, or the JSON itself\n"),
    (["serve", "--port", "99999"], "argument --port: '99999' is not a port: use a number from 0 to 65535 "
     "(0 picks a free one)\n"),
    (["serve", "--max-resident-adapters", "0"], "mlx-gemma: error: --max-resident-adapters 0: give a positive number\n"),
    (["serve", "--max-batch", "-1"], "mlx-gemma: error: --max-batch -1: give a positive number\n"),
    (["serve", "--max-queue", "0"], "mlx-gemma: error: --max-queue 0: give a positive number\n"),
    (["serve", "--fuse", "sql"], "mlx-gemma: error: --fuse sql names no adapter: pass --adapter sql=PATH too\n"),
    (["generate", "--model", "", "--prompt", "x"], "mlx-gemma: error: --model '' is empty: pass a model directory, "
     "a Hugging Face id, a .gguf file or demo, or leave --model out for the default\n"),
])
def test_bad_flags_are_one_line_before_any_model_loads(args, message):
    model = [] if "--model" in args else ["--model", "/no/such/model"]
    done = cli(*args[:1], *model, *args[1:])
    assert done.returncode == 2 and done.stderr.endswith(message) and "Traceback" not in done.stderr


def test_a_directory_flag_naming_a_file_is_refused(tmp_path):
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    refused = f"{a_file} is a file, not a directory: pass a directory path\n"
    for args in (["serve", "--model", "/no/such/model", "--data-dir", str(a_file)],
                 ["finetune", "list", "--data-dir", str(a_file / "store")],
                 ["fuse", "--model", "/no/such/model", "--adapter", ADAPTER, "--out", str(a_file)]):
        flag = "--out" if args[0] == "fuse" else "--data-dir"
        done = cli(*args)
        assert done.returncode == 2 and done.stderr.startswith(f"mlx-gemma: error: {flag} {args[-1]}: {refused}")


def test_an_os_error_is_one_line(tiny_dir):
    done = cli("fuse", "--model", str(tiny_dir), "--adapter", ADAPTER, "--out", "/proc/mlx-gemma-test")
    assert done.returncode == 2
    assert done.stderr == "mlx-gemma: error: /proc/mlx-gemma-test: No such file or directory: check the path and " \
                          "its permissions\n"


def test_serve_refuses_a_port_in_use_before_loading():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = cli("serve", "--model", "/no/such/model", "--port", str(port))
    assert done.returncode == 2
    assert done.stderr == (f"mlx-gemma: error: cannot listen on 127.0.0.1:{port} (Address already in use): stop the "
                           "program that uses it or pass another --port (or a --host of this machine)\n")


@pytest.mark.parametrize("host, url_host", [("127.0.0.1", "127.0.0.1"), ("::1", "[::1]")])
def test_serve_on_port_0_prints_the_port_it_listens_on(tiny_dir, tmp_path, host, url_host):
    if host == "::1" and not socket.has_ipv6:
        pytest.skip("no IPv6 here")
    server = subprocess.Popen([sys.executable, "-m", "mlx_gemma", "serve", "--model", str(tiny_dir), "--host", host,
                               "--port", "0", "--data-dir", str(tmp_path)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        lines = iter(server.stderr.readline, "")
        playground = next(line for line in lines if line.startswith("mlx-gemma: playground: ") or "error" in line)
        url = playground.removeprefix("mlx-gemma: playground: ").strip()
        assert url.startswith(f"http://{url_host}:") and not url.endswith(":0/"), playground
        import httpx
        for _ in range(200):
            try:
                health = httpx.get(f"{url}healthz", timeout=5).json()
                break
            except httpx.TransportError:
                time.sleep(0.05)
        assert health["status"] == "ok"
    finally:
        server.kill()
        server.wait()


@pytest.mark.parametrize("origin", ["http://localhost:3000/", "http://Localhost:3000", "localhost:3000",
                                    "http://localhost:3000?x=1", '["http://localhost:3000/"]'])
def test_serve_refuses_an_origin_that_is_not_one_before_loading(origin):
    done = cli("serve", "--model", "/no/such/model", "--allowed-origins", "*", origin)
    shown = origin.strip('[]"')
    assert done.returncode == 2
    assert done.stderr == (f"mlx-gemma: error: --allowed-origins {shown!r} is not an origin: write it as the browser "
                           "sends it, such as http://localhost:3000 (lowercase; no path, query or trailing slash), "
                           "or * for any page\n")


def test_allowed_origins_take_vllms_json_list_too():
    from mlx_gemma.cli import check_origins
    assert check_origins(["*", "http://localhost:3000", '["https://app.example:8443", "http://[::1]:5173"]']) == [
        "*", "http://localhost:3000", "https://app.example:8443", "http://[::1]:5173"]
    with pytest.raises(ValueError, match="a JSON list must hold strings"):
        check_origins(["[3000]"])


def test_a_closed_stdout_ends_quietly(tiny_dir):
    process = subprocess.Popen([sys.executable, "-m", "mlx_gemma", "generate", "--model", str(tiny_dir), "--prompt",
                                "x", "--max-tokens", "20"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    process.stdout.close()  # as `| head -c 10` does once it has read enough
    stderr = process.stderr.read()
    assert process.wait(timeout=120) == 141
    assert "Traceback" not in stderr and "BrokenPipeError" not in stderr


def test_adapter_dot_is_the_current_directory(tiny_dir):
    import mlx_gemma

    expected = mlx_gemma.load(tiny_dir, adapters={"a": ADAPTER}).generate(
        prompt="Water boils at", raw=True, temperature=0, max_tokens=8, lora="a").text
    done = cli("generate", "--model", str(tiny_dir), "--prompt", "Water boils at", "--raw", "--temperature", "0",
               "--max-tokens", "8", "--adapter", ".", cwd=ADAPTER)
    assert done.returncode == 0, done.stderr
    assert done.stdout == expected + "\n"


def test_openblas_turned_off_is_said_so(tiny_dir):
    done = cli("generate", "--model", str(tiny_dir), "--prompt", "x", "--max-tokens", "1",
               env={"MLX_GEMMA_OPENBLAS": "0"})
    assert done.returncode == 0, done.stderr
    assert "Linux CPU fast path off: float32 weights, OpenBLAS turned off by MLX_GEMMA_OPENBLAS=0" in done.stderr


def test_the_rank_limit_is_a_flag_of_every_command_that_reads_adapters(tiny_dir, tmp_path):
    """finetune create used to store an adapter over the server's rank limit, which then failed on
    every request; generate and fuse pointed at a serve flag they did not have."""
    over = ("rank 8 is over the limit of 4: train with r <= 4 (Workers AI's limit is 32), or raise the limit "
            "(--max-adapter-rank of mlx-gemma serve, generate, fuse and finetune create; max_adapter_rank= in Python)")
    store = ["--data-dir", str(tmp_path / "store")]
    created = cli("finetune", "create", "@cf/google/gemma-2b-it-lora", "r8", ADAPTER, "--max-adapter-rank", "4", *store)
    assert created.returncode == 2 and over in created.stderr, created.stderr
    assert cli("finetune", "list", *store).stdout == "no fine-tunes\n"
    generated = cli("generate", "--model", str(tiny_dir), "--adapter", ADAPTER, "--prompt", "Hi", "--max-adapter-rank",
                    "4")
    assert generated.returncode == 2 and over in generated.stderr, generated.stderr
    fused = cli("fuse", "--model", str(tiny_dir), "--adapter", ADAPTER, "--out", str(tmp_path / "f"),
                "--max-adapter-rank", "8")
    assert fused.returncode == 0, fused.stderr
    assert cli("finetune", "create", "@cf/google/gemma-2b-it-lora", "r8", ADAPTER, *store).returncode == 0


@pytest.mark.parametrize("command", [["generate", "--prompt", "Hi", "--adapter", "/no/such/adapter"],
                                     ["fuse", "--out", "/tmp/mlx-gemma-unused", "--adapter", "/no/such/adapter"],
                                     ["serve", "--adapter", "a=/no/such/adapter"]])
def test_a_missing_adapter_directory_is_refused_before_loading(command):
    done = cli(command[0], "--model", "/no/such/model", *command[1:])
    assert done.returncode == 2
    assert done.stderr == ("mlx-gemma: error: --adapter /no/such/adapter: no such directory: pass the folder that "
                           "holds the adapter's files (adapter_config.json and adapter_model.safetensors, or "
                           "mlx-lm's adapters.safetensors)\n")
