"""Command line: `mlx-gemma serve | generate | finetune | fuse`.

Each subcommand parses its flags, checks what it can before loading a model (sampling flags,
capacities, directories, that `serve` can listen on its host and port), calls the Python API,
and turns a bad value, or a path that cannot be read or written, into one line on stderr
naming it, with exit status 2. Output cut short by a closed pipe (`| head`) ends quietly with
exit status 141, as for a process killed by SIGPIPE.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path
from collections.abc import Sequence
from typing import Any

from . import _platform
from .loading import DTYPES, ModelLoadError


LORA_MODELS = ("@cf/google/gemma-2b-it-lora", "@cf/google/gemma-7b-it-lora")  # the routes a server answers to
SHUTDOWN_GRACE_SECONDS = 5  # serve: how long Ctrl-C waits for running requests before cancelling them


def _messages_arg(value: str) -> list[dict[str, Any]]:
    try:
        text = Path(value[1:]).expanduser().read_text(encoding="utf-8-sig") if value.startswith("@") else value
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise argparse.ArgumentTypeError(f"cannot read {value[1:]!r} ({why}): pass an existing JSON file "
                                         "as @file.json, or the JSON itself") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"--messages is not valid JSON ({exc}): pass a list such as "
                                         '\'[{"role": "user", "content": "Hi"}]\' or @file.json') from exc


def _port_arg(value: str) -> int:
    port = int(value) if re.fullmatch(r"\d{1,5}", value.strip()) else -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{value!r} is not a port: use a number from 0 to 65535 (0 picks a free one)")
    return port


def add_rank_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-adapter-rank", type=_positive_arg, default=32,
                        help="largest LoRA rank accepted (default 32, as Workers AI)")


def _positive_arg(value: str) -> int:
    number = int(value) if re.fullmatch(r"\s*\d+\s*", value) else 0
    if number < 1:
        raise argparse.ArgumentTypeError(f"{value!r}: give a positive whole number")
    return number


def add_model_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="a model directory, a Hugging Face id, a .gguf file or demo "
                        "(default: $MLX_GEMMA_MODEL, else google/gemma-2b-it if available, else demo)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="weights dtype (default: float32 on Linux)")
    parser.add_argument("--quantize", type=int, choices=(4, 8), help="quantize weights to 4 or 8 bits")


def add_sampling_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.6, help="0 is greedy (default 0.6)")
    parser.add_argument("--top-p", type=float)
    parser.add_argument("--top-k", type=int)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--repetition-penalty", type=float)
    parser.add_argument("--frequency-penalty", type=float)
    parser.add_argument("--presence-penalty", type=float)


def sampling_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    names = ["max_tokens", "temperature", "top_p", "top_k", "seed",
             "repetition_penalty", "frequency_penalty", "presence_penalty"]
    return {name: getattr(args, name) for name in names}


def check_sampling(args: argparse.Namespace) -> None:
    """Validate the sampling flags before a model loads; the message names them as flags."""
    from .sampler import GenerationParams

    try:
        GenerationParams(**sampling_kwargs(args)).validate()
    except ValueError as exc:
        message = str(exc)
        for name in sampling_kwargs(args):
            message = re.sub(rf"\b{name}=", f"--{name.replace('_', '-')} ", message)
        raise ValueError(message) from None


def adapter_name(path: str) -> str:
    """The name an adapter directory is served under: its own name (`.` is the current directory's)."""
    return Path(path).expanduser().resolve().name


def check_adapter_dirs(paths: Sequence[str]) -> None:
    """Refuse an --adapter that is no directory before the model loads (or downloads)."""
    for path in paths:
        if not Path(path).expanduser().is_dir():
            raise ValueError(f"--adapter {path}: no such directory: pass the folder that holds the adapter's files "
                             "(adapter_config.json and adapter_model.safetensors, or mlx-lm's adapters.safetensors)")


def check_dir_flag(flag: str, path: Path) -> None:
    """Refuse a directory flag that names a file, or a place where no directory can be made."""
    path = path.expanduser()
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        raise ValueError(f"{flag} {path}: {existing} is a file, not a directory: pass a directory path")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {path}: {existing} is not writable: pass a directory you can write to")


def bind(host: str, port: int) -> socket.socket:
    """The socket uvicorn will serve on, bound (as uvicorn binds) before a model loads: a taken port
    fails at once, and port 0's free port is known for the URLs the server prints."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)  # as uvicorn: localhost is 127.0.0.1
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as exc:  # socket.gaierror (an unknown host) too
        sock.close()
        raise ValueError(f"cannot listen on {host}:{port} ({exc.strerror or exc}): stop the program that uses "
                         "it or pass another --port (or a --host of this machine)") from None
    return sock


def base_url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _adapter_arg(value: str) -> tuple[str, str]:
    name, sep, path = value.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"--adapter {value!r}: write NAME=PATH, e.g. --adapter sql=./sql-lora")
    return name, path


def default_data_dir() -> Path:
    """$MLX_GEMMA_DATA_DIR, else the user's cache directory (~/Library/Caches on macOS)."""
    if os.environ.get("MLX_GEMMA_DATA_DIR"):
        return Path(os.environ["MLX_GEMMA_DATA_DIR"]).expanduser()
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "mlx-gemma"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mlx-gemma"


def add_serve_parser(commands: Any) -> None:
    serve = commands.add_parser("serve", help="serve the Workers AI and OpenAI routes over HTTP")
    add_model_flags(serve)
    serve.add_argument("--adapter", type=_adapter_arg, action="append", default=[], metavar="NAME=PATH",
                       help="a LoRA adapter served as lora=NAME (repeatable)")
    serve.add_argument("--fuse", metavar="NAME", help="merge the --adapter of that name into the weights")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=_port_arg, default=8787)
    serve.add_argument("--data-dir", type=Path, default=None, help="fine-tune store (default: the user cache dir)")
    serve.add_argument("--api-token", default=os.environ.get("MLX_GEMMA_API_TOKEN"),
                       help="require Authorization: Bearer TOKEN (default: $MLX_GEMMA_API_TOKEN)")
    serve.add_argument("--max-batch", type=int, default=8, help="rows decoded together")
    serve.add_argument("--max-queue", type=int, default=64, help="requests that may wait; more get 429")
    serve.add_argument("--max-resident-adapters", type=int, default=8)
    add_rank_flag(serve)
    serve.add_argument("--max-upload-mb", type=int, default=300, help="largest fine-tune file accepted (default 300)")
    serve.add_argument("--allowed-origins", nargs="+", default=[], metavar="ORIGIN",
                       help="web pages (e.g. http://localhost:3000, or *) whose scripts may call the server "
                            "from a browser (CORS); default: none but the server's own playground")
    serve.set_defaults(func=cmd_serve)


def add_finetune_parser(commands: Any) -> None:
    finetune = commands.add_parser("finetune", help="manage the local fine-tune store (like wrangler ai finetune)")
    actions = finetune.add_subparsers(dest="action", required=True)
    create = actions.add_parser("create", help="store an adapter folder as a fine-tune")
    create.add_argument("model", help="the base model name, e.g. @cf/google/gemma-2b-it-lora")
    create.add_argument("name", help="the fine-tune's unique name")
    create.add_argument("folder", type=Path, help="folder with adapter_config.json and adapter_model.safetensors")
    create.add_argument("--description", default="")
    create.add_argument("--public", action="store_true")
    add_rank_flag(create)
    listing = actions.add_parser("list", help="list the stored fine-tunes")
    listing.add_argument("--json", action="store_true", help="print JSON instead of a table")
    delete = actions.add_parser("delete", help="delete a fine-tune by id or name")
    delete.add_argument("finetune", help="id or name")
    for action in (create, listing, delete):
        action.add_argument("--data-dir", type=Path, default=None, help="the store (default: the user cache dir)")
        action.set_defaults(func=cmd_finetune)


BENCH_SUITE = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_suite.py"


def add_bench_parser(commands: Any) -> None:
    bench = commands.add_parser("bench", help="measure against mlx-lm (and llama.cpp): a table, JSON and a PNG")
    bench.add_argument("--model", help="only this model: tiny, 2b-shape, demo, a directory or a .gguf file "
                                       "(default: all three presets)")
    bench.add_argument("--quick", action="store_true", help="fewer models, runs and tokens (under 5 minutes)")
    bench.add_argument("--json", default="mlx-gemma-bench.json", help="where to write the measurements")
    bench.add_argument("--plot", default="mlx-gemma-bench.png", help="where to write the PNG")
    bench.set_defaults(func=cmd_bench)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mlx-gemma", description="Gemma on MLX with per-request LoRA")
    commands = parser.add_subparsers(dest="command", required=True)
    add_serve_parser(commands)
    gen = commands.add_parser("generate", help="generate text, streamed to stdout")
    add_model_flags(gen)
    source = gen.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="the prompt (a user turn, or as given with --raw)")
    source.add_argument("--messages", type=_messages_arg, help="chat messages as JSON, or @file.json")
    gen.add_argument("--raw", action="store_true", help="tokenize the prompt as given (no chat template)")
    gen.add_argument("--adapter", help="a LoRA adapter directory (PEFT or mlx-lm files) to apply")
    gen.add_argument("--fuse", action="store_true", help="merge --adapter into the weights instead")
    add_rank_flag(gen)
    add_sampling_flags(gen)
    gen.set_defaults(func=cmd_generate)
    fuse = commands.add_parser("fuse", help="merge a LoRA adapter into a model and write a checkpoint")
    add_model_flags(fuse)
    fuse.add_argument("--adapter", required=True, help="the LoRA adapter directory")
    add_rank_flag(fuse)
    fuse.add_argument("--out", required=True, help="directory for the fused checkpoint")
    fuse.set_defaults(func=cmd_fuse)
    add_finetune_parser(commands)
    add_bench_parser(commands)
    return parser


def resolve_model(args: argparse.Namespace) -> None:
    """Fill in args.model when none was named, saying loudly when the demo model stands in."""
    from .loading import default_model

    if args.model is not None:
        if not args.model.strip():
            raise ValueError(f"--model {args.model!r} is empty: pass a model directory, a Hugging Face id, "
                             "a .gguf file or demo, or leave --model out for the default")
        return
    args.model, why = default_model()
    if why:
        print(f"mlx-gemma: NOTE: {why}", file=sys.stderr, flush=True)


def cmd_serve(args: argparse.Namespace) -> None:
    import uvicorn

    import mlx_gemma
    from .server.app import build_app
    from .server.service import Settings

    adapters = dict(args.adapter)
    sock = check_serve_flags(args, adapters)
    resolve_model(args)
    runtime = mlx_gemma.load(args.model, adapters=adapters, dtype=args.dtype, quantize=args.quantize, fuse=args.fuse,
                             max_resident_adapters=args.max_resident_adapters, max_queue=args.max_queue,
                             max_batch=args.max_batch, max_adapter_rank=args.max_adapter_rank)
    settings = Settings(data_dir=args.data_dir, api_token=args.api_token or None,
                        max_upload_bytes=args.max_upload_mb * 1024 * 1024, allowed_origins=args.allowed_origins)
    app = build_app(runtime, settings)
    _log_serving(app.state.service, args, base_url(args.host, sock.getsockname()[1]))
    # Ctrl-C: requests still running after the grace period are cancelled (their rows freed, streams
    # ended) rather than waited for; a chat without max_tokens can run to a full context.
    config = uvicorn.Config(app, log_level="info", timeout_graceful_shutdown=SHUTDOWN_GRACE_SECONDS)
    uvicorn.Server(config).run(sockets=[sock])


def check_serve_flags(args: argparse.Namespace, adapters: dict[str, str]) -> socket.socket:
    """Everything `serve` can refuse before the model loads; fills in args.data_dir and returns the
    socket to serve on."""
    names = [name for name, _ in args.adapter]
    if len(adapters) < len(names):
        twice = next(name for name in names if names.count(name) > 1)
        raise ValueError(f"--adapter {twice}= is given twice: give each adapter its own name")
    check_adapter_dirs(list(adapters.values()))
    for name in ("max_batch", "max_queue", "max_resident_adapters", "max_upload_mb"):  # --max-adapter-rank: its type
        value = getattr(args, name)
        if value < 1:
            raise ValueError(f"--{name.replace('_', '-')} {value}: give a positive number")
    if args.fuse is not None and args.fuse not in adapters:
        raise ValueError(f"--fuse {args.fuse} names no adapter: pass --adapter {args.fuse}=PATH too")
    args.data_dir = args.data_dir or default_data_dir()
    check_dir_flag("--data-dir", args.data_dir)
    args.allowed_origins = check_origins(args.allowed_origins)
    return bind(args.host, args.port)


def check_origins(values: list[str]) -> list[str]:
    """The origins of --allowed-origins: each a scheme and host (and port), as a browser sends it, or
    * for any page. vLLM's form, one JSON list such as '["http://localhost:3000"]', is read too."""
    origins = []
    for value in values:
        listed = _json_list(value) if value.startswith("[") else [value]
        for origin in listed:
            if origin != "*" and not re.fullmatch(r"https?://[a-z0-9.\-]+(:\d{1,5})?|https?://\[[0-9a-f:]+\](:\d{1,5})?",
                                                  origin):
                raise ValueError(f"--allowed-origins {origin!r} is not an origin: write it as the browser sends "
                                 "it, such as http://localhost:3000 (lowercase; no path, query or trailing slash), "
                                 "or * for any page")
            origins.append(origin)
    return origins


def _json_list(value: str) -> list[Any]:
    try:
        listed = json.loads(value)
    except json.JSONDecodeError:
        listed = None
    if not isinstance(listed, list) or not all(isinstance(item, str) for item in listed):
        raise ValueError(f"--allowed-origins {value!r}: a JSON list must hold strings, such as "
                         '\'["http://localhost:3000"]\'')
    return listed


def _log_serving(service: Any, args: argparse.Namespace, url: str) -> None:
    runtime = service.runtime
    names = ", ".join(service.served_models())
    finetunes = service.store.list()
    lines = [f"mlx-gemma: serving {runtime!r} from {runtime.loaded.path}",
             f"mlx-gemma: {_platform.startup_note(runtime.loaded.dtype)}",
             f"mlx-gemma: models: {names}",
             f"mlx-gemma: adapters: {', '.join(sorted(service.static_adapters)) or 'none'}"
             + (f"; fused: {runtime.fused['name']}" if runtime.fused else ""),
             f"mlx-gemma: fine-tunes: {len(finetunes)} in {service.settings.data_dir}"
             + (f" ({', '.join(f.name for f in finetunes)})" if finetunes else ""),
             f"mlx-gemma: max batch {args.max_batch}, max queue {args.max_queue}"
             + (", bearer token required" if service.settings.api_token else ", no token required"),
             f"mlx-gemma: Workers AI: POST {url}/client/v4/accounts/<account>/ai/run/"
             f"{service.served_models()[0]}  OpenAI: {url}/v1",
             f"mlx-gemma: playground: {url}/"]
    print("\n".join(lines), file=sys.stderr, flush=True)


def cmd_finetune(args: argparse.Namespace) -> None:
    from .lora.store import FinetuneStore

    data_dir = args.data_dir or default_data_dir()
    check_dir_flag("--data-dir", data_dir)
    store = FinetuneStore(data_dir, validate=_files_check(getattr(args, "max_adapter_rank", None)))
    if args.action == "create":
        finetune = _create_finetune(store, args)
        print(f"created fine-tune {finetune.name} ({finetune.id}) for {finetune.model} in {store.data_dir}")
    elif args.action == "delete":
        finetune = store.delete(args.finetune)
        print(f"deleted fine-tune {finetune.name} ({finetune.id})")
    elif args.json:
        print(json.dumps([f.to_dict() for f in store.list()], indent=2))
    else:
        _print_finetunes(store.list())


def _files_check(max_rank: int | None) -> Any:
    """What `finetune create` checks without a base model: the files, with the rank limit given."""
    from .lora.adapters import AdapterLimits, check_adapter_files

    if max_rank is None:
        return None
    return lambda staging: check_adapter_files(staging, None, AdapterLimits(max_rank=max_rank))


def _create_finetune(store: Any, args: argparse.Namespace) -> Any:
    from .lora.store import ASSET_NAMES

    if args.model not in LORA_MODELS:
        raise ValueError(f"model {args.model!r} is not served here: fine-tunes are for {' or '.join(LORA_MODELS)} "
                         "(the route's name, as the server and Workers AI take it)")
    missing = [name for name in ASSET_NAMES if not (args.folder / name).is_file()]
    if missing:
        raise ValueError(f"{args.folder} has no {' or '.join(missing)}: a fine-tune needs both {' and '.join(ASSET_NAMES)}")
    finetune = store.create(args.model, args.name, args.description, args.public)
    try:
        for name in ASSET_NAMES:
            with open(args.folder / name, "rb") as source:
                finetune = store.add_asset(finetune.id, name, source)
    except BaseException:
        store.delete(finetune.id)  # all or nothing
        raise
    return finetune


def _print_finetunes(finetunes: list[Any]) -> None:
    if not finetunes:
        print("no fine-tunes")
        return
    print(f"{'id':36}  {'name':24}  {'model':30}  {'files':5}  description")
    for f in finetunes:
        print(f"{f.id:36}  {f.name:24}  {f.model:30}  {len(f.files)}/2    {f.description}")


def cmd_generate(args: argparse.Namespace) -> None:
    import mlx_gemma

    if args.fuse and not args.adapter:
        raise ValueError("--fuse needs --adapter PATH: the adapter to merge")
    check_sampling(args)
    check_adapter_dirs([args.adapter] if args.adapter else [])
    resolve_model(args)
    name = adapter_name(args.adapter) if args.adapter else None
    adapters = {name: args.adapter} if name else None
    fuse = name if args.fuse else None
    runtime = mlx_gemma.load(args.model, adapters=adapters, dtype=args.dtype, quantize=args.quantize, fuse=fuse,
                             max_adapter_rank=args.max_adapter_rank)
    print(f"[{runtime!r}; {_platform.startup_note(runtime.loaded.dtype)}]", file=sys.stderr)
    lora = None if args.fuse else name
    start = time.perf_counter()
    stream = runtime.stream(prompt=args.prompt, messages=args.messages, raw=args.raw, lora=lora,
                            **sampling_kwargs(args))
    for piece in stream:
        sys.stdout.write(piece)
        sys.stdout.flush()
    seconds = time.perf_counter() - start
    sys.stdout.write("\n")
    usage = stream.usage
    print(f"[prompt {usage.prompt_tokens} tokens, generated {usage.completion_tokens} in {seconds:.2f} s "
          f"({usage.completion_tokens / max(seconds, 1e-9):.1f} tokens/s), finish: {stream.finish_reason}]",
          file=sys.stderr)


def cmd_fuse(args: argparse.Namespace) -> None:
    import mlx_gemma
    from .loading import check_checkpoint_target, save_checkpoint

    if args.quantize:
        raise ValueError(f"--quantize {args.quantize}: fuse writes dense weights, so quantizing the base first "
                         "would only add its rounding error to them; fuse without it, then quantize the result "
                         "(mlx-gemma serve --model OUT --quantize 4, or mlx_lm.convert -q)")
    check_adapter_dirs([args.adapter])
    check_dir_flag("--out", Path(args.out))
    check_checkpoint_target(args.out)  # before the model loads: a full --out fails at once
    resolve_model(args)
    name = adapter_name(args.adapter)
    runtime = mlx_gemma.load(args.model, adapters={name: args.adapter}, dtype=args.dtype,
                             quantize=args.quantize, fuse=name, max_adapter_rank=args.max_adapter_rank)
    out = save_checkpoint(runtime.loaded, runtime.model, args.out)
    fused = runtime.fused
    print(f"wrote {out}: adapter {name} ({fused['format']}, rank {fused['rank']}, {fused['modules']} layers) "
          f"fused into {args.model}; weights are dense {runtime.loaded.dtype}"
          + (" (quantized layers were dequantized)" if runtime.loaded.quantization else ""))


def cmd_bench(args: argparse.Namespace) -> None:
    if not BENCH_SUITE.exists():
        raise RuntimeError(f"{BENCH_SUITE} is missing: `mlx-gemma bench` runs the benchmarks/ scripts of a source "
                           "checkout; install it with pip install -e '.[bench]' from the checkout")
    argv = ["--json", args.json, "--plot", args.plot] + (["--quick"] if args.quick else [])
    argv += ["--model", args.model] if args.model else []
    done = subprocess.run([sys.executable, str(BENCH_SUITE), *argv])
    if done.returncode != 0:
        raise RuntimeError(f"the benchmark suite exited with {done.returncode}")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, ModelLoadError, RuntimeError) as exc:
        print(f"mlx-gemma: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # stdout closed early (| head): stop quietly, as other command line tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so exit's flush cannot fail again
        return 141
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"mlx-gemma: error: {where}{exc.strerror or exc}: check the path and its permissions", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
