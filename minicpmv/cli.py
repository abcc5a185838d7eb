"""The ``minicpmv`` command: serve, run, chat, batch, download, demo-checkpoint."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import threading
import time
from pathlib import Path

from minicpmv.errors import MiniCPMVError
from minicpmv.processing.options import DOWNSAMPLE_MODES, RANGES, ProcessingOptions


def _int_in(low: int, high: int | None = None):
    """An argparse type: an integer in [low, high]."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low or (high is not None and value > high):
            bound = f"in [{low}, {high}]" if high is not None else f">= {low}"
            raise argparse.ArgumentTypeError(f"must be an integer {bound}, got {text!r}")
        return value
    return parse


def _size(text: str) -> int:
    from minicpmv.engine.memory import parse_size

    try:
        return parse_size(text)
    except MiniCPMVError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="checkpoint directory, Hugging Face repo id (e.g. openbmb/MiniCPM-V-4.6) or llama.cpp "
                                 ".gguf language model")
    p.add_argument("--mmproj", type=Path, default=None, metavar="FILE",
                   help="the vision projector GGUF of a .gguf model (default: the mmproj GGUF beside it)")
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"])
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda when present)")
    p.add_argument("--max-num-seqs", type=_int_in(1), default=16, help="sequences decoded together")
    p.add_argument("--max-model-len", type=_int_in(2), default=None, help="context limit (default: the model's)")
    p.add_argument("--quantization", choices=["int8", "int4"], default=None,
                   help="weight-only quantization (CPU); on a GPTQ / AWQ / GGUF file: of what it left dense")
    p.add_argument("--max-state-memory", type=_size, default=None, metavar="SIZE",
                   help="memory for sequence state (attention KV + DeltaNet), e.g. 4GiB; requests reserve prompt + "
                        "max_tokens worth and wait for room (default: half the memory available at start)")
    p.add_argument("--lora-modules", nargs="+", type=_lora_module, default=[], metavar="NAME=PATH",
                   help="PEFT LoRA adapters to serve (NAME=PATH or vLLM's JSON {\"name\": ..., \"path\": ...})")
    p.add_argument("--max-loras", type=_int_in(1), default=8, help="LoRA adapters loaded at once")
    p.add_argument("--max-lora-rank", type=_int_in(1), default=64, help="largest LoRA rank accepted")
    p.add_argument("--merge-lora", type=Path, default=None, metavar="PATH",
                   help="fold this one LoRA adapter into the weights (full speed for every request)")
    p.add_argument("--enable-lora", action="store_true", help=argparse.SUPPRESS)  # vLLM's flag: adapters always work


def _lora_module(text: str) -> tuple[str, str]:
    """--lora-modules entries: NAME=PATH, or vLLM's JSON form {"name": ..., "path": ...}."""
    if text.lstrip().startswith("{"):
        try:
            entry = json.loads(text)
            return str(entry["name"]), str(entry["path"])
        except (ValueError, KeyError, TypeError):
            raise argparse.ArgumentTypeError(f"a JSON LoRA module needs \"name\" and \"path\", got {text!r}") from None
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, got {text!r}")
    return name, path


def _constraint_args(p: argparse.ArgumentParser) -> None:
    """The answer's form (a row's own response_format overrides it in batch)."""
    constrain = p.add_mutually_exclusive_group()
    constrain.add_argument("--json-schema", type=Path, metavar="FILE", help="answer with JSON valid against this schema")
    constrain.add_argument("--regex", help="answer with text matching this regular expression")
    constrain.add_argument("--choice", action="append", help="answer with exactly one of these (repeatable)")
    constrain.add_argument("--grammar", type=Path, metavar="FILE", help="answer in this Lark grammar")


def _processing_args(p: argparse.ArgumentParser) -> None:
    low, high = RANGES["max_slice_nums"]
    p.add_argument("--mode", dest="downsample_mode", choices=DOWNSAMPLE_MODES, default=None,
                   help="visual token compression (default 16x)")
    p.add_argument("--max-slices", dest="max_slice_nums", type=_int_in(low, high), default=None,
                   help="max slices per image (model card: 36)")
    low, high = RANGES["max_num_frames"]
    p.add_argument("--max-frames", dest="max_num_frames", type=_int_in(low, high), default=None,
                   help="frames sampled from a video (default 128)")
    low, high = RANGES["stack_frames"]
    p.add_argument("--stack-frames", dest="stack_frames", type=_int_in(low, high), default=None,
                   help="3 or 5: pack sub-second video frames into one canvas")
    p.add_argument("--no-image-id", dest="use_image_id", action="store_const", const=False, default=None,
                   help="do not number images and videos in the prompt (model card: off for video)")
    p.add_argument("--think", action="store_true", help="let the model think before answering")


def _processing(args) -> dict:
    """The processing flags as ProcessingOptions fields (None: the checkpoint's setting)."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(ProcessingOptions)}


def _sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=_int_in(1), default=512)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)


class _Parser(argparse.ArgumentParser):
    """Bad arguments give one line (not the whole usage) and exit code 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("minicpmv")
    except PackageNotFoundError:
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="minicpmv", description="MiniCPM-V 4.6 inference and serving")
    parser.add_argument("--version", action="version", version=f"minicpmv {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="OpenAI-compatible HTTP server with a web chat at /")
    _engine_args(serve)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=_int_in(1, 65535), default=8000)
    serve.add_argument("--api-key", default=None,
                       help="require 'Authorization: Bearer KEY' (or x-api-key: KEY) on /v1/*, /api/*, /tokenize, /detokenize")
    serve.add_argument("--served-model-name", default=None, help="the model id clients send (default: MODEL)")
    serve.add_argument("--max-waiting", type=_int_in(1), default=256, help="queued requests before 429")
    serve.add_argument("--allowed-local-media-path", type=Path, default=None, help="file:// media allowed under it")
    serve.add_argument("--allow-private-media-urls", action="store_true", help="allow media URLs on private networks")
    serve.add_argument("--max-image-pixels", type=_int_in(1), default=None, help="refuse larger images (default 64 Mpx)")
    serve.add_argument("--max-body-mb", type=_int_in(1), default=100, help="largest request body")
    serve.add_argument(
        "--demo-fallback",
        type=Path,
        default=None,
        metavar="DIR",
        help="when MODEL cannot be found or downloaded, serve a random-weight demo checkpoint written to DIR",
    )
    serve.add_argument("--enable-lora-loading", action="store_true",
                       help="allow POST /v1/load_lora_adapter and /v1/unload_lora_adapter (behind --api-key)")
    serve.add_argument("--default-max-tokens", type=_int_in(1), default=None,
                       help="max_tokens of requests that omit it (default: the rest of the context; 256 for a demo checkpoint)")
    serve.add_argument("--shutdown-timeout", type=float, default=10.0, metavar="SECONDS",
                       help="on SIGTERM / Ctrl-C, how long requests in flight may take to finish (default 10)")
    serve.add_argument("--log-level", choices=["debug", "info", "warning", "error"], default="info",
                       help="info: a start-up summary and one line per request")
    serve.add_argument("--ray-replicas", type=_int_in(1), default=None, metavar="N",
                       help="serve N engine replicas with Ray Serve behind one endpoint (pip install 'minicpmv[ray]')")
    serve.add_argument("--threads-per-replica", type=_int_in(1), default=1, help="Ray Serve: CPUs per replica")
    serve.add_argument("--ray-address", default=None, help="Ray Serve: an existing cluster (default: a local one)")
    serve.add_argument("--enable-test-hooks", action="store_true", help=argparse.SUPPRESS)

    run = sub.add_parser("run", help="answer one question about images / videos and exit")
    _engine_args(run)
    run.add_argument("question")
    run.add_argument("--image", action="append", default=[], help="image file (repeatable)")
    run.add_argument("--video", action="append", default=[], help="video file (repeatable)")
    run.add_argument("--json", action="store_true", help="print the full result as JSON")
    _constraint_args(run)
    _processing_args(run)
    _sampling_args(run)

    chat = sub.add_parser("chat", help="interactive terminal chat")
    _engine_args(chat)
    _processing_args(chat)
    _sampling_args(chat)

    tune = sub.add_parser("finetune", help="LoRA fine-tuning on a JSONL of conversations; writes a PEFT adapter")
    tune.add_argument("model", help="checkpoint directory or Hugging Face repo id")
    tune.add_argument("data", type=Path, help="JSONL: OpenAI messages (image/video parts) or ShareGPT conversations")
    tune.add_argument("output_dir", type=Path)
    tune.add_argument("--rank", type=_int_in(1), default=8)
    tune.add_argument("--alpha", type=float, default=16.0)
    tune.add_argument("--dropout", type=float, default=0.0)
    tune.add_argument("--target", nargs="+", default=["all"], help="linear names (q_proj ... down_proj, lm_head) or all")
    tune.add_argument("--freeze-vision", action="store_true", help="no LoRA on the vision tower and merger")
    tune.add_argument("--epochs", type=_int_in(1), default=1)
    tune.add_argument("--lr", type=float, default=1e-4)
    tune.add_argument("--batch-size", type=_int_in(1), default=1)
    tune.add_argument("--grad-accum", type=_int_in(1), default=1)
    tune.add_argument("--max-length", type=_int_in(2), default=4096, help="longer examples are skipped")
    tune.add_argument("--warmup-ratio", type=float, default=0.0)
    tune.add_argument("--lr-scheduler", choices=["cosine", "constant"], default="cosine")
    tune.add_argument("--save-steps", type=_int_in(0), default=0, help="also save a resumable checkpoint every N steps")
    tune.add_argument("--no-gradient-checkpointing", action="store_true", help="faster, more memory")
    tune.add_argument("--eval", type=Path, default=None, metavar="DATA", help="held-out JSONL: eval loss per epoch")
    tune.add_argument("--resume", action="store_true", help="continue from OUTPUT_DIR/checkpoint")
    tune.add_argument("--mode", choices=["16x", "4x"], default=None, help="visual token compression (as served)")
    tune.add_argument("--max-slices", type=_int_in(1), default=None)
    tune.add_argument("--think", action="store_true", help="build prompts with thinking on")
    tune.add_argument("--seed", type=int, default=0)
    tune.add_argument("--device", default="auto")

    batch = sub.add_parser("batch", help="run every row of a JSONL / Parquet / CSV file or a folder of media")
    _engine_args(batch)
    batch.add_argument("input", type=Path, help=".jsonl, .parquet or .csv (one request per row), or a folder of media")
    batch.add_argument("output", type=Path, help=".jsonl file or .parquet folder; a rerun resumes it")
    batch.add_argument("--prompt", default=None, help="the question for rows without one (a folder's files)")
    batch.add_argument("--window", type=_int_in(1), default=None, help="rows in flight (default 2 x max-num-seqs)")
    batch.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                       help="run on Ray Data (a local cluster, or the cluster at ADDRESS)")
    batch.add_argument("--workers", type=_int_in(1), default=1, help="Ray: engine actors")
    batch.add_argument("--threads-per-worker", type=_int_in(1), default=1, help="Ray: CPUs (torch threads) per actor")
    batch.add_argument("--no-progress", dest="progress", action="store_false", default=None)
    _constraint_args(batch)
    _processing_args(batch)
    _sampling_args(batch)

    download = sub.add_parser("download", help="fetch a model into the local Hugging Face cache")
    download.add_argument("model", help="repo id, e.g. openbmb/MiniCPM-V-4.6")

    demo = sub.add_parser("demo-checkpoint", help="write a random-weight checkpoint with the real tokenizer")
    demo.add_argument("directory", type=Path)
    demo.add_argument("--size", choices=["tiny", "full"], default="tiny")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--force", action="store_true", help="write into DIR even when it already holds files")
    return parser


def _llm_kwargs(args) -> dict:
    """``LLM(**...)`` from the engine flags (engine_config as a dict, so it also travels to Ray Serve replicas)."""
    config = {"max_num_seqs": args.max_num_seqs, "max_model_len": args.max_model_len,
              "max_state_bytes": args.max_state_memory}
    if hasattr(args, "max_waiting"):  # serve only
        config["max_waiting"] = args.max_waiting
    names = [name for name, _ in args.lora_modules]
    if len(set(names)) != len(names):
        raise MiniCPMVError(f"--lora-modules names must be unique, got {names}")
    return {"model": args.model, "dtype": args.dtype, "device": args.device, "engine_config": config,
            "quantization": args.quantization, "lora_modules": {n: str(p) for n, p in args.lora_modules},
            "max_loras": args.max_loras, "max_lora_rank": args.max_lora_rank,
            "merge_lora": None if args.merge_lora is None else str(args.merge_lora),
            "mmproj": None if args.mmproj is None else str(args.mmproj)}


def _llm(args, **options):
    from minicpmv.engine.engine import EngineConfig
    from minicpmv.llm import LLM

    kwargs = _llm_kwargs(args)
    return LLM(**{**kwargs, "engine_config": EngineConfig(**kwargs["engine_config"])}, **options)


def _structured(args):
    """--json-schema / --regex / --choice / --grammar as the one StructuredOutputs they mean (or None)."""
    from minicpmv.engine.sampling import StructuredOutputs

    def read(path: Path, what: str) -> str:
        try:
            return path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise MiniCPMVError(f"cannot read the {what} {path}: {exc}") from None

    if getattr(args, "json_schema", None) is not None:
        text = read(args.json_schema, "JSON schema")
        try:
            schema = json.loads(text)
        except ValueError as exc:
            raise MiniCPMVError(f"{args.json_schema} is not valid JSON: {exc}") from None
        return StructuredOutputs(json=schema, param="--json-schema")
    if getattr(args, "regex", None) is not None:
        return StructuredOutputs(regex=args.regex, param="--regex")
    if getattr(args, "choice", None):
        return StructuredOutputs(choice=args.choice, param="--choice")
    if getattr(args, "grammar", None) is not None:
        return StructuredOutputs(grammar=read(args.grammar, "grammar"), param="--grammar")
    return None


def _sampling(args):
    from minicpmv.engine.sampling import SamplingParams

    return SamplingParams(
        temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed, max_tokens=args.max_tokens,
        structured=_structured(args),
    )


def cmd_run(args) -> int:
    for path in [*args.image, *args.video]:
        if not Path(path).is_file():
            raise MiniCPMVError(f"no such file: {path}")
    params = _sampling(args)
    llm = _llm(args)
    content = [{"type": "image", "image": p} for p in args.image] + [{"type": "video", "video": p} for p in args.video]
    content.append({"type": "text", "text": args.question})
    start, first, result = time.perf_counter(), None, None
    stream = llm.chat_stream([{"role": "user", "content": content}], params, enable_thinking=args.think, **_processing(args))
    for delta in stream:
        if first is None and delta.token_ids:
            first = time.perf_counter()  # the prompt is in: what follows is decode
        result = delta.result or result
    end = time.perf_counter()
    elapsed, first = end - start, first or end
    if args.json:
        out = {
            "text": result.text,
            "reasoning": result.reasoning,
            "tool_calls": [{"id": c.id, "name": c.name, "arguments": c.arguments} for c in result.tool_calls],
            "finish_reason": result.finish_reason,
            "usage": {**vars(result.usage), "total_tokens": result.usage.total_tokens},
            "timings": {  # prefill (to the first token) apart from decode (the tokens after it)
                "seconds": round(elapsed, 3),
                "prefill_seconds": round(first - start, 3),
                "decode_seconds": round(end - first, 3),
                "decode_tokens_per_second": round((len(result.token_ids) - 1) / (end - first), 2)
                if len(result.token_ids) > 1 and end > first else None,
            },
        }
        print(json.dumps(out, ensure_ascii=False, indent=2))
    else:
        if result.reasoning:
            print(f"[thinking] {result.reasoning}\n", file=sys.stderr)
        print(result.text or "")
    return 0


DEMO_BANNER = """
################################################################################
#  DEMO CHECKPOINT: the weights are RANDOM. Answers are noise.                 #
#  Everything else (tokenizer, template, images, streaming, API) is real.      #
#  For real answers: minicpmv download openbmb/MiniCPM-V-4.6, then serve it.   #
################################################################################
"""


def _model_or_demo(model: str, demo_dir: Path) -> str:
    from minicpmv.checkpoint import resolve
    from minicpmv.demo import write_demo_checkpoint

    try:
        return str(resolve(model))
    except MiniCPMVError as exc:
        print(f"minicpmv: {exc}", file=sys.stderr)
    if not (demo_dir / "model.safetensors").exists():
        print(f"minicpmv: writing a tiny random-weight demo checkpoint to {demo_dir}", file=sys.stderr)
        write_demo_checkpoint(demo_dir, size="tiny")
    return str(demo_dir)


def cmd_serve(args) -> int:
    import uvicorn

    from minicpmv.serve.app import create_app
    from minicpmv.serve.lifecycle import GracefulServer
    from minicpmv.serve.logs import log_startup

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    if args.allowed_local_media_path is not None and not args.allowed_local_media_path.is_dir():
        raise MiniCPMVError(f"--allowed-local-media-path {args.allowed_local_media_path} is not a directory")
    requested = args.model  # clients keep using this id, even when a demo checkpoint stands in for it
    if args.demo_fallback is not None:
        args.model = _model_or_demo(args.model, args.demo_fallback)
    if args.ray_replicas:
        return _serve_on_ray(args, requested)
    llm = _llm(args)
    if llm.demo:
        print(DEMO_BANNER, file=sys.stderr)
    # The grammar tokenizer (constrained output) takes seconds to build: build it now, beside the server's start.
    threading.Thread(target=lambda: llm.grammars.tokenizer, name="minicpmv-grammar-tokenizer", daemon=True).start()
    if args.max_image_pixels:
        settings = llm.processor.image_settings
        llm.processor.image_settings = dataclasses.replace(settings, max_pixels=args.max_image_pixels)
    config = _server_config(args, requested, llm.demo)
    app = create_app(llm, config)
    log_startup(llm, config)
    print(f"serving {config.model_name} on http://{args.host}:{args.port}  (web chat at /)", file=sys.stderr)
    uv_level = "info" if args.log_level == "debug" else "warning"
    server = GracefulServer(
        uvicorn.Config(app, host=args.host, port=args.port, log_level=uv_level, timeout_graceful_shutdown=5),
        app.state.drain, llm.close, shutdown_timeout=args.shutdown_timeout,
    )
    try:
        server.run()
    finally:
        llm.close()
    # Everything is ended and answered: skip the interpreter's teardown of the model and tokenizer (seconds of C-level
    # finalization, which a supervisor's stop timeout would count) and exit 0 now.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _server_config(args, requested: str, demo: bool):
    from minicpmv.llm import DEMO_MAX_TOKENS
    from minicpmv.serve.app import ServerConfig
    from minicpmv.serve.media import MediaPolicy

    return ServerConfig(
        model_name=args.served_model_name or requested,
        api_key=args.api_key,
        max_body_bytes=args.max_body_mb << 20,
        media=MediaPolicy(allow_private=args.allow_private_media_urls, allowed_local_path=args.allowed_local_media_path),
        enable_test_hooks=args.enable_test_hooks,
        enable_lora_loading=args.enable_lora_loading,
        default_max_tokens=args.default_max_tokens or (DEMO_MAX_TOKENS if demo else None),
    )


def _serve_on_ray(args, requested: str) -> int:
    from minicpmv.batch import ray_serve

    if args.enable_lora_loading:  # an adapter loaded through one replica would be missing from the others
        raise MiniCPMVError("--enable-lora-loading does not work with --ray-replicas; name the adapters with --lora-modules")
    # (each replica's LLM caps a demo checkpoint's answers itself)
    spec = ray_serve.ReplicaSpec(_llm_kwargs(args), _server_config(args, requested, demo=False), args.threads_per_replica,
                                 args.max_image_pixels)
    print(f"serving {requested} on http://{args.host}:{args.port} with {args.ray_replicas} Ray Serve replicas",
          file=sys.stderr)
    ray_serve.run(spec, args.ray_replicas, args.max_num_seqs, args.host, args.port, args.ray_address)
    return 0


def cmd_download(args) -> int:
    from minicpmv.checkpoint import REPO_FILES

    try:
        from huggingface_hub import snapshot_download

        path = snapshot_download(args.model, allow_patterns=REPO_FILES)
    except Exception as exc:
        raise MiniCPMVError(f"could not download {args.model}: {type(exc).__name__}: {exc}") from None
    print(path)
    return 0


def cmd_demo(args) -> int:
    from minicpmv.demo import write_demo_checkpoint

    if args.directory.exists() and not args.directory.is_dir():
        raise MiniCPMVError(f"cannot write a checkpoint to {args.directory}: it is not a directory")
    if args.directory.is_dir() and any(args.directory.iterdir()) and not args.force:
        raise MiniCPMVError(f"{args.directory} already holds files; choose an empty directory or pass --force to "
                            "write over them")
    try:
        path = write_demo_checkpoint(args.directory, size=args.size, seed=args.seed)
    except OSError as exc:
        raise MiniCPMVError(f"cannot write a checkpoint to {args.directory}: {exc}") from None
    print(f"wrote a {args.size} random-weight checkpoint to {path}")
    return 0


def cmd_finetune(args) -> int:
    from minicpmv.finetune import FinetuneConfig, finetune

    cfg = FinetuneConfig(
        rank=args.rank, alpha=args.alpha, dropout=args.dropout, targets=args.target, freeze_vision=args.freeze_vision,
        epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, grad_accum=args.grad_accum,
        max_length=args.max_length, warmup_ratio=args.warmup_ratio, lr_scheduler=args.lr_scheduler, seed=args.seed, save_steps=args.save_steps,
        gradient_checkpointing=not args.no_gradient_checkpointing, enable_thinking=args.think,
        downsample_mode=args.mode, max_slice_nums=args.max_slices,
    )
    log = finetune(args.model, args.data, args.output_dir, cfg, eval_data=args.eval, resume=args.resume, device=args.device)
    losses = [e["loss"] for e in log if "loss" in e]
    print(f"wrote a LoRA adapter to {args.output_dir} ({len(losses)} steps, last loss {losses[-1]:.4f})" if losses
          else f"nothing left to train: the adapter in {args.output_dir} is up to date")
    return 0


def cmd_chat(args) -> int:
    from minicpmv.chat import interactive

    params = _sampling(args)  # bad sampling flags fail before the model loads, not at every turn
    return interactive(_llm(args), params, {"enable_thinking": args.think, **_processing(args)})


def cmd_batch(args) -> int:
    from minicpmv.batch.cli import run

    return run(args, _processing(args), _sampling(args), lambda: _llm(args))


COMMANDS = {"serve": cmd_serve, "run": cmd_run, "chat": cmd_chat, "finetune": cmd_finetune, "batch": cmd_batch,
            "download": cmd_download, "demo-checkpoint": cmd_demo}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except MiniCPMVError as exc:
        message = " ".join(str(exc).split())  # one line, whatever the dependency's message looked like
        print(f"minicpmv: error: {message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
