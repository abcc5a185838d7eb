"""The interactive terminal chat behind ``minicpmv chat``: streamed answers, slash commands, history kept."""

from __future__ import annotations

import sys
from pathlib import Path

from minicpmv.errors import MiniCPMVError

HELP = """commands:
  /image PATH      attach an image to your next message      /video PATH   attach a video
  /think on|off    thinking before answering                 /mode 4x|16x  visual token compression
  /slices N        max slices per image                      /reset        forget the conversation
  /help            this text                                 /quit         leave (or Ctrl-D)"""


def interactive(llm, params, options: dict, stdin=sys.stdin, out=sys.stdout) -> int:
    """Chat on ``stdin`` / ``out`` with ``params`` (SamplingParams) and chat ``options``, which commands change."""
    history: list[dict] = []
    pending: list[dict] = []
    options = dict(options)
    if llm.demo:
        print("WARNING: demo checkpoint with RANDOM weights: answers are noise.", file=sys.stderr)
    print("minicpmv chat. /help for commands.", file=out)
    while True:
        print("> ", end="", file=out, flush=True)
        line = stdin.readline()
        if not line:
            return 0
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            cmd, _, arg = line.partition(" ")
            arg = arg.strip()
            if cmd == "/quit":
                return 0
            if cmd == "/help":
                print(HELP, file=out)
            elif cmd in ("/image", "/video"):
                if not Path(arg).is_file():
                    print(f"error: no such file: {arg}", file=out)
                    continue
                kind = cmd[1:]
                pending.append({"type": kind, kind: arg})
                print(f"attached {kind} {arg}", file=out)
            elif cmd == "/think" and arg in ("on", "off"):
                options["enable_thinking"] = arg == "on"
            elif cmd == "/mode" and arg in ("4x", "16x"):
                options["downsample_mode"] = arg
            elif cmd == "/slices":
                if arg.isdigit() and int(arg) > 0:
                    options["max_slice_nums"] = int(arg)
                else:
                    print(f"error: /slices takes a positive integer, got {arg!r}", file=out)
            elif cmd == "/reset":
                history.clear()
                pending.clear()
                print("conversation cleared", file=out)
            else:
                print(f"error: bad command {line!r}; /help lists them", file=out)
            continue
        message = {"role": "user", "content": [*pending, {"type": "text", "text": line}]}
        try:
            result = None
            thinking = False
            for delta in llm.chat_stream(history + [message], params, **options):
                if delta.reasoning:
                    if not thinking:
                        print("[thinking] ", end="", file=out)
                        thinking = True
                    print(delta.reasoning, end="", file=out, flush=True)
                if delta.text:
                    if thinking:
                        print("\n[answer] ", end="", file=out)
                        thinking = False
                    print(delta.text, end="", file=out, flush=True)
                result = delta.result or result
            print(file=out)
        except MiniCPMVError as exc:
            print(f"error: {exc}", file=out)
            if pending:  # an unreadable attachment would fail every later message
                print(f"(the message was not sent; its {len(pending)} attachment(s) were dropped)", file=out)
                pending.clear()
            continue
        history.append(message)
        history.append({"role": "assistant", "content": result.text or "", "reasoning_content": result.reasoning})
        pending.clear()
