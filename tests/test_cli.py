"""The ``minicpmv`` command through its real entry point (a subprocess), on a demo checkpoint it writes itself."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx2 as httpx
import pytest

from tests.tiny import image

EXE = str(Path(sys.executable).with_name("minicpmv"))
OFFLINE = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}  # this checkout; no hub


def cli(*args, stdin: str | None = None, timeout: int = 180) -> subprocess.CompletedProcess:
    return subprocess.run([EXE, *map(str, args)], input=stdin, capture_output=True, text=True, timeout=timeout, env=OFFLINE)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    directory = tmp_path_factory.mktemp("cli") / "demo"
    r = cli("demo-checkpoint", directory)
    assert r.returncode == 0, r.stderr
    assert "random-weight" in r.stdout
    return directory


@pytest.fixture(scope="module")
def picture(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "pic.png"
    image(300, 200).save(path)
    return path


@pytest.mark.parametrize("command", [[], ["serve"], ["run"], ["chat"], ["download"], ["demo-checkpoint"]])
def test_help_everywhere(command):
    r = cli(*command, "--help")
    assert r.returncode == 0 and "usage: minicpmv" in r.stdout


def test_demo_checkpoint_is_complete(demo):
    names = {p.name for p in demo.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
            "preprocessor_config.json", "processor_config.json", "generation_config.json"} <= names
    assert json.loads((demo / "config.json").read_text())["demo_random_weights"] is True


def test_run_json(demo, picture):
    r = cli("run", demo, "--image", picture, "--max-tokens", 5, "--seed", 1, "--json", "What is this?")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["usage"]["image_tokens"] > 0 and out["usage"]["completion_tokens"] == 5
    assert out["finish_reason"] == "length" and out["timings"]["seconds"] > 0
    t = out["timings"]  # decode speed without the prefill (the image encode and the prompt)
    assert 0 < t["prefill_seconds"] < t["seconds"] and t["decode_tokens_per_second"] > 0
    assert t["decode_tokens_per_second"] == round(4 / t["decode_seconds"], 2) or abs(
        t["decode_tokens_per_second"] - 4 / t["decode_seconds"]) < 0.1 * t["decode_tokens_per_second"]
    assert "RANDOM weights" in r.stderr and r.stderr.count("RANDOM") == 1  # one warning: a demo checkpoint


def test_version_and_demo_checkpoint_refuses_a_directory_with_files(demo, tmp_path):
    r = cli("--version")
    assert r.returncode == 0 and r.stdout.startswith("minicpmv 0.")
    (tmp_path / "notes.txt").write_text("mine")
    r = cli("demo-checkpoint", tmp_path)
    assert r.returncode == 1 and "--force" in r.stderr and not (tmp_path / "model.safetensors").exists()
    r = cli("demo-checkpoint", demo)  # an existing checkpoint is not overwritten either
    assert r.returncode == 1 and "already holds files" in r.stderr


def test_chat_ctrl_c_stops_the_answer_and_keeps_the_chat_commands_confirm_quit_leaves(demo):
    import signal

    # SIGINT at its default, as in a terminal: a suite started in the background (cmd &) inherits it ignored, and a
    # Python started so never raises KeyboardInterrupt.
    proc = subprocess.Popen([EXE, "chat", demo, "--max-tokens", "100000", "--temperature", "1.0"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=OFFLINE,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        banner = "minicpmv chat. /help for commands.\n> "
        assert proc.stdout.read(len(banner)) == banner  # (printed once the model is loaded)
        proc.stdin.write("Tell me everything.\n")
        proc.stdin.flush()
        assert proc.stdout.read(1)  # the answer streams (noise: it never ends by itself), however loaded the machine
        time.sleep(1)
        proc.send_signal(signal.SIGINT)
        time.sleep(1)
        out, err = proc.communicate("/think on\n/think maybe\n/mode 2x\n/mode 4x\nquit\nnever read\n", timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "[stopped]" in out and "Traceback" not in err
    after = out.split("[stopped]")[1]  # the chat went on
    assert "thinking on" in after and "/think takes on or off" in after
    assert "/mode takes one of 16x, 4x, got '2x'" in after and "visual token compression 4x" in after
    assert after.count("> ") == 5  # "quit" left: the line after it was never read


def test_run_with_a_json_schema(demo, tmp_path):
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 1, "maximum": 9},
              "tag": {"enum": ["a", "b"]}}, "required": ["n", "tag"], "additionalProperties": False}
    path = tmp_path / "schema.json"
    path.write_text(json.dumps(schema))
    r = cli("run", demo, "--json-schema", path, "--max-tokens", 40, "--seed", 2, "Numbers?")
    assert r.returncode == 0, r.stderr
    answer = json.loads(r.stdout)
    assert set(answer) == {"n", "tag"} and 1 <= answer["n"] <= 9 and answer["tag"] in ("a", "b")


def test_run_quantized(demo):
    r = cli("run", demo, "--max-tokens", 3, "--quantization", "int8", "--json", "Hi")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["usage"]["completion_tokens"] == 3


def test_run_plain_and_4x(demo, picture):
    r16 = cli("run", demo, "--image", picture, "--max-tokens", 3, "--json", "Hi")
    r4 = cli("run", demo, "--image", picture, "--max-tokens", 3, "--mode", "4x", "--json", "Hi")
    assert json.loads(r4.stdout)["usage"]["image_tokens"] > json.loads(r16.stdout)["usage"]["image_tokens"]
    plain = cli("run", demo, "--max-tokens", 3, "Hi")
    assert plain.returncode == 0 and plain.stdout.strip() != "" and not plain.stdout.startswith("{")


@pytest.mark.parametrize(
    "args, code, needle",
    [
        (["run", "{demo}", "--image", "/no/such.png", "q"], 1, "no such file: /no/such.png"),
        (["run", "{demo}", "--mode", "8x", "q"], 2, "invalid choice: '8x'"),
        (["run", "{demo}", "--max-tokens", "zero", "q"], 2, "--max-tokens: must be an integer >= 1, got 'zero'"),
        (["run", "{demo}", "--max-num-seqs", "0", "q"], 2, "--max-num-seqs: must be an integer >= 1"),
        (["serve", "{demo}", "--port", "99999"], 2, "--port: must be an integer in [1, 65535]"),
        (["chat", "{demo}", "--temperature", "-1"], 1, "temperature"),
        (["demo-checkpoint", "{demo}/config.json"], 1, "cannot write a checkpoint to"),
        (["run", "/no/such/model", "q"], 1, "not a checkpoint directory"),
        (["run", "{demo}", "--temperature", "-1", "q"], 1, "temperature"),
        (["run", "{demo}", "--regex", "a", "--choice", "b", "q"], 2, "not allowed with argument"),
        (["download", "someone/nothing-here"], 1, "could not download someone/nothing-here"),
        (["frobnicate"], 2, "invalid choice"),
    ],
)
def test_errors_are_one_line_with_nonzero_exit(demo, args, code, needle):
    r = cli(*[a.format(demo=demo) for a in args])
    assert r.returncode == code
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and lines[0].startswith("minicpmv"), r.stderr
    assert "Traceback" not in r.stderr


def test_interactive_chat(demo, picture):
    script = f"/help\n/think on\n/image {picture}\n/mode 4x\n/slices 4\nWhat is it?\n/image /no/file.png\n/bogus\n/reset\nAgain?\n/quit\n"
    r = cli("chat", demo, "--max-tokens", 4, "--seed", 0, stdin=script)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "commands:" in out and f"attached image {picture}" in out
    assert "error: no such file: /no/file.png" in out and "error: bad command '/bogus'" in out
    assert "conversation cleared" in out
    assert out.count("> ") >= 10  # one prompt per input line


def test_interactive_chat_drops_an_unreadable_attachment(demo, tmp_path):
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("hello")
    r = cli("chat", demo, "--max-tokens", 2, stdin=f"/image {not_an_image}\nWhat is it?\nAnd now?\n/slices 0\n/quit\n")
    assert r.returncode == 0, r.stderr
    assert "not a recognised image format" in r.stdout and "1 attachment(s) were dropped" in r.stdout
    assert r.stdout.count("error:") == 2 and "/slices takes a positive integer" in r.stdout  # "And now?" was answered


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(*args):
    port = free_port()
    proc = subprocess.Popen([EXE, "serve", *map(str, args), "--port", str(port)], stderr=subprocess.PIPE, text=True, env=OFFLINE)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.3)
        assert proc.poll() is None, proc.stderr.read()
    proc.kill()
    raise AssertionError("server did not come up")


def stop(proc) -> str:
    """SIGTERM an idle server: it exits 0, cleanly."""
    proc.terminate()
    try:
        err = proc.communicate(timeout=30)[1]
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.communicate()[1]
    assert proc.returncode == 0 and "Traceback" not in err, err
    return err


def test_serve_answers_a_chat(demo):
    proc, url = serve(demo, "--served-model-name", "demo")
    try:
        body = {"model": "demo", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}
        r = httpx.post(url + "/v1/chat/completions", json=body, timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
        assert "<html" in httpx.get(url + "/", timeout=10).text.lower()
        card = httpx.get(url + "/v1/models", timeout=10).json()["data"][0]
        assert card["demo_random_weights"] is True and card["default_max_tokens"] == 256
        r = httpx.post(url + "/v1/chat/completions", json={**body, "max_tokens": None, "ignore_eos": True}, timeout=120)
        assert r.json()["usage"]["completion_tokens"] == 256  # a demo checkpoint's default
    finally:
        err = stop(proc)
    assert "DEMO CHECKPOINT" in err  # a demo checkpoint is always announced
    assert "start-up: model=demo" in err and "state_memory=" in err and "kernels=" in err  # the summary
    assert " 200 prompt=" in err and "completion=3" in err and "finish=length" in err  # an access line per request


def test_serve_falls_back_to_a_demo_checkpoint_offline(tmp_path):
    proc, url = serve("someone/not-cached", "--demo-fallback", tmp_path / "fallback")
    try:
        models = httpx.get(url + "/v1/models", timeout=10).json()
        assert models["data"][0]["id"] == "someone/not-cached"
        assert (tmp_path / "fallback" / "model.safetensors").exists()
    finally:
        err = stop(proc)
    assert "DEMO CHECKPOINT" in err and "RANDOM" in err
