"""The interactive terminal chat behind ``minicpmv chat``: streamed answers, slash commands, history kept."""

from __future__ import annotations

import sys
from pathlib import Path

from minicpmv.errors import MiniCPMVError
from minicpmv.processing.options import DOWNSAMPLE_MODES

HELP = """commands:
  /image PATH      attach an image to your next message      /video PATH   attach a video
  /think on|off    thinking before answering                 /mode 4x|16x  visual token compression
  /slices N        max slices per image                      /reset        forget the conversation
  /help            this text                                 /quit, quit, exit   leave (or Ctrl-D)
Ctrl-C during an answer stops that answer; the chat goes on."""


def interactive(llm, params, options: dict, stdin=sys.stdin, out=sys.stdout) -> int:
    """Chat on ``stdin`` / ``out`` with ``params`` (SamplingParams) and chat ``options``, which commands change."""
    history: list[dict] = []
    pending: list[dict] = []
    options = dict(options)  # (a demo checkpoint's warning comes from LLM())
    print("minicpmv chat. /help for commands.", file=out)
    while True:
        print("> ", end="", file=out, flush=True)
        try:
            line = stdin.readline()
        except KeyboardInterrupt:
            print("\n(Ctrl-D, quit or /quit leaves)", file=out)
            continue
        if not line:
            return 0
        line = line.strip()
        if not line:
            continue
        if line.lower() in ("quit", "exit"):
            return 0
        if line.startswith("/"):
            cmd, _, arg = line.partition(" ")
            arg = arg.strip()
            if cmd in ("/quit", "/exit"):
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
            elif cmd == "/think":
                if arg in ("on", "off"):
                    options["enable_thinking"] = arg == "on"
                    print(f"thinking {arg}", file=out)
                else:
                    print(f"error: /think takes on or off, got {arg!r}", file=out)
            elif cmd == "/mode":
                if arg in DOWNSAMPLE_MODES:
                    options["downsample_mode"] = arg
                    print(f"visual token compression {arg}", file=out)
                else:
                    print(f"error: /mode takes one of {', '.join(DOWNSAMPLE_MODES)}, got {arg!r}", file=out)
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
        stream = llm.chat_stream(history + [message], params, **options)
        text, reasoning = [], []
        try:
            result = None
            thinking = False
            for delta in stream:
                text.append(delta.text)
                reasoning.append(delta.reasoning)
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
        except KeyboardInterrupt:  # stop this answer (closing the stream aborts it), keep what came and the chat
            stream.close()
            print("\n[stopped]", file=out, flush=True)
            history.append(message)
            history.append({"role": "assistant", "content": "".join(text), "reasoning_content": "".join(reasoning) or None})
            pending.clear()
            continue
        except MiniCPMVError as exc:
            print(f"error: {exc}", file=out)
            if pending:  # an unreadable attachment would fail every later message
                print(f"(the message was not sent; its {len(pending)} attachment(s) were dropped)", file=out)
                pending.clear()
            continue
        history.append(message)
        history.append({"role": "assistant", "content": result.text or "", "reasoning_content": result.reasoning})
        pending.clear()
