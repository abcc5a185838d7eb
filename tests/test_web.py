"""The web chat page (minicpmv/serve/web/index.html) in headless Chromium against a real server on 127.0.0.1.

The browser is the Debian `chromium` (scripts/install_test_deps.sh installs it), driven by the Python `playwright`
package (the `test` extra) through `executable_path`: no browser is downloaded at runtime. A missing
browser or driver fails these tests with instructions; they are never skipped.

The page never sends the server's test hooks. To make the model's output deterministic, each page's requests to
/v1/chat/completions pass through a Playwright route that records the body the page built and merges extra fields
(`test_output`, `ignore_eos`, `max_tokens`) into it before it continues to the real server. Every page load is
checked to fetch nothing but the server's own files (the Markdown, KaTeX and highlighting libraries are shipped).
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from minicpmv.engine.engine import EngineConfig
from minicpmv.llm import LLM
from minicpmv.serve.app import ServerConfig
from tests.tiny import KEY, WEATHER_TOOL, Server, call_xml

ROOT = Path(__file__).resolve().parents[1]
SCREENSHOT = ROOT / "bench" / "out" / "web_chat.png"
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
LAUNCH_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               "--disable-dev-shm-usage"]
TIMEOUT_MS = 60_000


def _playwright():
    try:
        from playwright import sync_api
    except ImportError:
        pytest.fail("the web tests need the Python 'playwright' package: "
                    "pip install -e '.[test]' or make test (no 'playwright install' needed)", pytrace=False)
    return sync_api


@pytest.fixture(scope="module")
def web_server(tiny_dir):
    llm = LLM(tiny_dir, dtype="float32", progress=False, engine_config=EngineConfig(max_num_seqs=4, max_waiting=16))
    s = Server(llm, ServerConfig(model_name="tiny", api_key=KEY, max_body_bytes=8 << 20, enable_test_hooks=True))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def browser():
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        found = shutil.which("chromium")
        pytest.fail(f"Chromium is not installed at {CHROMIUM}{f' (found {found}; set CHROMIUM=...)' if found else ''}: "
                    "run scripts/install_test_deps.sh (apt-get install chromium) before the web tests", pytrace=False)
    sync_api = _playwright()
    sync_api.expect.set_options(timeout=TIMEOUT_MS)  # (a long forced answer takes the tiny model a few seconds)
    driver = sync_api.sync_playwright().start()
    try:
        # launch() runs Chromium on a fresh temporary user-data-dir (Playwright refuses --user-data-dir here);
        # each test then gets its own context, so localStorage starts empty every time.
        browser = driver.chromium.launch(executable_path=CHROMIUM, headless=True, args=LAUNCH_ARGS)
    except Exception:
        driver.stop()
        raise
    yield browser
    browser.close()
    driver.stop()


class Route:
    """Records what the page sends to /v1/chat/completions and merges `inject` into it on the way to the server."""

    def __init__(self):
        self.inject: dict = {}
        self.bodies: list[dict] = []
        self.headers: list[dict] = []

    def __call__(self, route, request):
        body = json.loads(request.post_data)
        self.bodies.append(body)
        self.headers.append(request.headers)
        route.continue_(post_data=json.dumps({**body, **self.inject}))


@pytest.fixture
def page(browser, web_server):
    context = browser.new_context(viewport={"width": 1000, "height": 900}, device_scale_factor=1)
    context.grant_permissions(["clipboard-read", "clipboard-write"], origin=web_server.url)
    context.set_default_timeout(TIMEOUT_MS)
    page = context.new_page()
    errors: list[str] = []
    foreign: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("request", lambda r: None if r.url.startswith((web_server.url + "/", "data:", "blob:")) else foreign.append(r.url))
    page.route_log = Route()
    page.route("**/v1/chat/completions", page.route_log)
    page.goto(web_server.url + "/")
    yield page
    context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"
    assert not foreign, f"the page fetched from elsewhere than the server: {foreign}"


def png(color=(220, 40, 40), size=(96, 64)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def mp4() -> bytes:
    import av

    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=4)
        stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
        for i in range(8):
            frame = av.VideoFrame.from_ndarray(np.full((64, 64, 3), i * 30, np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


def expect(locator):
    return _playwright().expect(locator)


def log_in(page):
    """A fresh page has no API key: the model list is refused (shown as an error) until the key is entered."""
    expect(page.get_by_test_id("error")).to_contain_text("401")
    expect(page.get_by_test_id("error")).to_contain_text("API key")
    settings(page, True)
    page.get_by_test_id("api-key").fill(KEY)
    page.get_by_test_id("api-key").press("Tab")  # change event: stored, models reloaded
    expect(page.get_by_test_id("model-id")).to_have_text("tiny")
    expect(page.get_by_test_id("error")).to_be_hidden()
    settings(page, False)


def settings(page, open_: bool):
    if page.get_by_test_id("settings").is_visible() != open_:
        page.get_by_test_id("settings-toggle").click()
    expect(page.get_by_test_id("settings")).to_be_visible() if open_ else expect(page.get_by_test_id("settings")).to_be_hidden()


def ask(page, text, inject=None, state="done"):
    """Type and send with Enter; wait for the answer to finish; return the new assistant message."""
    page.route_log.inject = inject or {}
    before = page.get_by_test_id("assistant-message").count()
    page.get_by_test_id("prompt").fill(text)
    page.get_by_test_id("prompt").press("Enter")
    message = page.get_by_test_id("assistant-message").nth(before)
    expect(message).to_have_attribute("data-state", state)
    return message


def stored_conversations(page) -> list[dict]:
    return json.loads(page.evaluate("localStorage.getItem('minicpmv-web:conversations')") or "[]")


def watch_answer_lengths(page):
    """Record every length the newest answer goes through, to see the answer arrive piece by piece."""
    page.evaluate("""() => {
        window.__lengths = [];
        const t = document.getElementById('transcript');
        new MutationObserver(() => {
            const answers = t.querySelectorAll('[data-testid=answer]');
            if (answers.length) window.__lengths.push(answers[answers.length - 1].textContent.length);
        }).observe(t, {subtree: true, childList: true, characterData: true});
    }""")


def test_chat_images_thinking_tools_and_screenshot(page, web_server):
    log_in(page)
    assert page.evaluate("localStorage.getItem('minicpmv-web:api-key')") == KEY

    # an image, shown as a thumbnail before sending; Enter sends; the answer streams in
    page.get_by_test_id("image-input").set_input_files({"name": "red.png", "mimeType": "image/png", "buffer": png()})
    thumb = page.get_by_test_id("attachments").locator("img")
    expect(thumb).to_have_count(1)
    assert thumb.get_attribute("src").startswith("data:image/png;base64,")
    watch_answer_lengths(page)
    first_answer = "The picture is a plain red rectangle, wider than it is tall."
    first = ask(page, "What is in this picture?", {"test_output": first_answer})
    expect(first.get_by_test_id("answer")).to_have_text(first_answer)
    lengths = page.evaluate("window.__lengths")
    # (two partial states at least: a busy machine's server sends several tokens in one write now and then)
    assert len({n for n in lengths if 0 < n < len(first_answer)}) >= 2, f"not streamed incrementally: {lengths}"
    expect(page.get_by_test_id("attachment")).to_have_count(0)
    expect(page.get_by_test_id("user-message").first.locator("img")).to_have_count(1)
    expect(first.get_by_test_id("reasoning")).to_be_hidden()
    expect(first.get_by_test_id("status")).to_contain_text("Done")

    body, headers = page.route_log.bodies[0], page.route_log.headers[0]
    assert headers["authorization"] == f"Bearer {KEY}"
    assert body["model"] == "tiny" and body["stream"] is True
    assert body["chat_template_kwargs"] == {"enable_thinking": False}
    assert body["mm_processor_kwargs"] == {"downsample_mode": "16x"}
    [user] = body["messages"]
    assert [p["type"] for p in user["content"]] == ["image_url", "text"]
    assert user["content"][0]["image_url"]["url"] == "data:image/png;base64," + base64.b64encode(png()).decode()
    assert user["content"][1]["text"] == "What is in this picture?"

    # thinking on, 4x, two slices: a reasoning block fills from reasoning_content; the history goes back as text
    page.get_by_test_id("thinking").check()
    page.get_by_test_id("downsample").select_option("4x")
    settings(page, True)
    page.get_by_test_id("max-slices").fill("2")
    settings(page, False)
    second = ask(page, "Which colour is it exactly?",
                 {"test_output": "The pixels are all (220, 40, 40).\nThat is a strong red.\n</think>\n\nIt is a bright red, like a tomato."})
    reasoning = second.get_by_test_id("reasoning")
    expect(reasoning).to_be_visible()
    expect(reasoning.get_by_test_id("reasoning-text")).to_have_text("The pixels are all (220, 40, 40).\nThat is a strong red.")
    expect(second.get_by_test_id("answer")).to_have_text("It is a bright red, like a tomato.")
    assert reasoning.evaluate("d => d.tagName") == "DETAILS"
    reasoning.locator("summary").click()  # collapsible: collapsed once the answer started, opens on click
    assert reasoning.evaluate("d => d.open") is True
    body = page.route_log.bodies[1]
    assert body["chat_template_kwargs"] == {"enable_thinking": True}
    assert body["mm_processor_kwargs"] == {"downsample_mode": "4x", "max_slice_nums": 2}
    assert body["messages"][1:] == [{"role": "assistant", "content": first_answer},
                                    {"role": "user", "content": "Which colour is it exactly?"}]

    # tools from the Advanced section; the answer's tool call shows its name and pretty JSON arguments
    page.get_by_test_id("thinking").uncheck()
    settings(page, True)
    page.get_by_test_id("tools").fill(json.dumps([WEATHER_TOOL]))
    # the settings are a column beside the transcript: open, they cover none of it
    panel, transcript = page.get_by_test_id("settings").bounding_box(), page.get_by_test_id("transcript").bounding_box()
    assert transcript["x"] + transcript["width"] <= panel["x"] and transcript["width"] >= 400
    settings(page, False)
    third = ask(page, "And the weather in Paris?",
                {"test_output": "Let me check.\n\n" + call_xml("get_weather", city="Paris", days=2)})
    call = third.get_by_test_id("tool-call")
    expect(call).to_have_count(1)
    expect(call.get_by_test_id("tool-name")).to_have_text("get_weather")
    args = call.get_by_test_id("tool-args").text_content()
    assert json.loads(args) == {"city": "Paris", "days": 2} and args == json.dumps({"city": "Paris", "days": 2}, indent=2)
    expect(third.get_by_test_id("answer")).to_have_text("Let me check.")
    expect(third.get_by_test_id("status")).to_contain_text("Tool call")
    assert page.route_log.bodies[2]["tools"] == [WEATHER_TOOL]

    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    page.set_viewport_size({"width": 1000, "height": 1250})  # the whole conversation in view
    page.get_by_test_id("transcript").evaluate("t => t.scrollTop = 0")
    page.screenshot(path=str(SCREENSHOT))
    page.set_viewport_size({"width": 390, "height": 844})  # a phone: nothing may overflow sideways
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    assert page.evaluate("[...document.querySelectorAll('.msg')].every(m => m.getBoundingClientRect().right <= window.innerWidth)")
    page.screenshot(path=str(SCREENSHOT.with_name("web_chat_narrow.png")))
    expect(page.get_by_test_id("sidebar")).not_to_be_in_viewport()  # on a phone the conversations are a drawer
    page.get_by_test_id("sidebar-toggle").click()
    expect(page.get_by_test_id("sidebar")).to_be_in_viewport()
    page.get_by_test_id("conversation-title").click()  # choosing one closes it
    expect(page.get_by_test_id("sidebar")).not_to_be_in_viewport()
    page.set_viewport_size({"width": 1000, "height": 900})

    # copy the first answer
    first.get_by_test_id("copy").click()
    expect(first.get_by_test_id("copy")).to_have_text("Copied")
    assert page.evaluate("navigator.clipboard.readText()") == first_answer


def test_paste_video_escaping_and_errors(page, web_server):
    log_in(page)

    # a pasted image becomes a thumbnail, which can be removed again
    page.get_by_test_id("prompt").focus()
    page.evaluate("""async (b64) => {
        const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
        const data = new DataTransfer();
        data.items.add(new File([bytes], 'pasted.png', {type: 'image/png'}));
        document.getElementById('prompt').dispatchEvent(new ClipboardEvent('paste', {clipboardData: data, bubbles: true, cancelable: true}));
    }""", base64.b64encode(png((0, 120, 255))).decode())
    expect(page.get_by_test_id("attachment")).to_have_count(1)
    page.get_by_test_id("attachment").locator(".remove").click()
    expect(page.get_by_test_id("attachment")).to_have_count(0)

    # a video goes as a video_url data URI part and is answered
    settings(page, True)
    page.get_by_test_id("max-tokens").fill("3")
    page.get_by_test_id("video-input").set_input_files({"name": "clip.mp4", "mimeType": "video/mp4", "buffer": mp4()})
    expect(page.get_by_test_id("attachment")).to_have_attribute("data-kind", "video")
    page.get_by_test_id("prompt").fill("Describe the video.")
    page.get_by_test_id("prompt").press("Enter")
    page.wait_for_function("() => document.querySelector('[data-testid=assistant-message][data-state=done]')")
    body = page.route_log.bodies[-1]
    assert body["max_tokens"] == 3
    parts = body["messages"][0]["content"]
    assert [p["type"] for p in parts] == ["video_url", "text"]
    assert parts[0]["video_url"]["url"] == "data:video/mp4;base64," + base64.b64encode(mp4()).decode()
    expect(page.get_by_test_id("error")).to_be_hidden()
    expect(page.get_by_test_id("assistant-message").first.get_by_test_id("status")).to_contain_text("token limit")
    expect(page.get_by_test_id("attachment")).to_have_count(0)

    # model text is shown as text, never parsed as HTML
    hostile = '<img src=x onerror="window.__pwned=1"><b>bold</b> & <script>window.__pwned=2</script>'
    message = ask(page, "Say something odd.", {"test_output": hostile, "max_tokens": 200})
    expect(message.get_by_test_id("answer")).to_have_text(hostile)
    assert message.get_by_test_id("answer").locator("img, b, script").count() == 0
    assert page.evaluate("window.__pwned") is None

    # a refused request shows the server's JSON error and gives the message back for editing
    page.get_by_test_id("max-slices").fill("100")
    count = page.get_by_test_id("assistant-message").count()
    page.get_by_test_id("prompt").fill("Too many slices?")
    page.get_by_test_id("send").click()
    error = page.get_by_test_id("error")
    expect(error).to_be_visible()
    expect(error).to_contain_text("Error 400")
    expect(error).to_contain_text("max_slice_nums")
    expect(page.get_by_test_id("prompt")).to_have_value("Too many slices?")
    expect(page.get_by_test_id("assistant-message")).to_have_count(count)
    expect(page.get_by_test_id("send")).to_be_enabled()

    # invalid tools JSON is caught before sending
    page.get_by_test_id("max-slices").fill("")
    page.get_by_test_id("tools").fill("[{not json")
    page.get_by_test_id("send").click()
    expect(error).to_contain_text("Tools are not valid JSON")
    assert len(page.route_log.bodies) == 3


def test_stop_keeps_partial_answer_and_frees_the_sequence(page, web_server):
    engine = web_server.llm.engine
    log_in(page)
    page.route_log.inject = {"max_tokens": 20000, "ignore_eos": True, "temperature": 1.0, "seed": 3}
    page.get_by_test_id("prompt").fill("Go on forever.")
    page.get_by_test_id("send").click()
    message = page.get_by_test_id("assistant-message").last
    expect(page.get_by_test_id("stop")).to_be_visible()
    expect(page.get_by_test_id("send")).to_be_disabled()
    page.wait_for_function("() => { const a = document.querySelectorAll('[data-testid=answer]'); "
                           "return a.length && a[a.length - 1].textContent.length > 20; }")
    assert len(engine.scheduler) == 1
    page.get_by_test_id("stop").click()
    expect(message).to_have_attribute("data-state", "stopped")
    expect(message.get_by_test_id("status")).to_contain_text("Stopped")
    deadline = time.time() + 5
    while len(engine.scheduler) and time.time() < deadline:
        time.sleep(0.05)
    assert len(engine.scheduler) == 0, "the stopped request's sequence is still in the engine"
    partial = message.get_by_test_id("answer").text_content()
    assert len(partial) > 20
    time.sleep(0.3)
    assert message.get_by_test_id("answer").text_content() == partial  # nothing arrives after the stop
    expect(page.get_by_test_id("stop")).to_be_hidden()
    expect(page.get_by_test_id("send")).to_be_enabled()

    # the chat goes on, with the partial answer (the raw text behind the rendered Markdown) in the history
    [conversation] = stored_conversations(page)
    kept = conversation["turns"][1]
    assert kept["state"] == "stopped" and len(kept["content"]) > 20
    after = ask(page, "Still there?", {"test_output": "Yes."})
    expect(after.get_by_test_id("answer")).to_have_text("Yes.")
    assert page.route_log.bodies[-1]["messages"][1] == {"role": "assistant", "content": kept["content"]}


MARKDOWN_ANSWER = r"""# Sums
**bold**, *it*, `code`, [link](https://example.com/docs); costs $5 and $10.
- one
- two

```python
def add(a, b):
    return a + b
```
$e^{i\pi}+1=0$ and \(x^2\)
$$\frac{1}{2}$$
| a | b |
|---|---|
| 1 | 2 |"""

# Each probe would run script if the answer were taken as HTML, or its links followed as written.
XSS_PROBES = "\n\n".join([
    "<script>window.__pwned=1</script>",
    '<img src=x onerror="window.__pwned=2">',
    "[a](javascript:window.__pwned=3)",
    '<a href="javascript:window.__pwned=4">b</a>',
    "![c](javascript:window.__pwned=5)",
    '<svg onload="window.__pwned=6">',
    r"$\href{javascript:window.__pwned=7}{x}$",
    '<details open ontoggle="window.__pwned=8">',
    "```html\n<script>window.__pwned=9</script>\n```",
])

UNSAFE_JS = """(root) => [...root.querySelectorAll('*')].filter(e =>
    ['SCRIPT', 'IMG', 'SVG', 'IFRAME', 'OBJECT', 'EMBED', 'STYLE', 'FORM'].includes(e.tagName.toUpperCase())
    || [...e.attributes].some(a => a.name.startsWith('on') || a.name === 'srcdoc'
                                   || /^\\s*(javascript|data|vbscript):/i.test(a.value))).map(e => e.outerHTML)"""


def test_markdown_code_math_and_xss_probes(page, web_server):
    dialogs: list[str] = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    log_in(page)
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    message = ask(page, "Show me some Markdown.", {"test_output": MARKDOWN_ANSWER, "max_tokens": 400})
    answer = message.get_by_test_id("answer")
    expect(answer.locator("h1")).to_have_text("Sums")
    expect(answer.locator("strong")).to_have_text("bold")
    expect(answer.locator("em")).to_have_text("it")
    expect(answer.locator("p code")).to_have_text("code")
    link = answer.locator("a", has_text="link")
    assert link.get_attribute("href") == "https://example.com/docs"
    assert link.get_attribute("target") == "_blank" and "noopener" in link.get_attribute("rel")
    expect(answer.locator("li")).to_have_count(2)
    expect(answer.locator("td")).to_have_count(2)
    expect(answer.locator("p", has_text="costs")).to_contain_text("costs $5 and $10.")  # prices are not math
    assert answer.locator("p", has_text="costs").locator(".katex").count() == 0

    # code: highlighted by language, with its own copy button
    block = answer.get_by_test_id("code-block")
    expect(block).to_have_count(1)
    expect(block.locator("pre")).to_have_text("def add(a, b):\n    return a + b", use_inner_text=True)
    assert block.locator(".hljs-keyword").first.text_content() == "def"

    # math: inline $…$ and \(…\), display $$…$$, typeset by KaTeX (MathML inside) with its shipped fonts
    expect(answer.locator(".katex")).to_have_count(3)
    expect(answer.locator(".katex-display")).to_have_count(1)
    annotations = answer.locator("annotation").all_text_contents()
    assert annotations == [r"e^{i\pi}+1=0", "x^2", r"\frac{1}{2}"]
    page.wait_for_function("() => document.fonts.status === 'loaded'")
    assert page.evaluate("[...document.fonts].some(f => f.family.replace(/\"/g, '') === 'KaTeX_Main' && f.status === 'loaded')")

    # the picture in docs/web-chat.png: Markdown, code and math, with the settings open beside the transcript
    settings(page, True)
    page.set_viewport_size({"width": 1280, "height": 860})
    page.screenshot(path=str(SCREENSHOT.with_name("web_chat_markdown.png")))
    page.set_viewport_size({"width": 1000, "height": 900})
    settings(page, False)

    # each code block copies exactly its code; the whole answer copies as the model wrote it
    block.get_by_test_id("code-copy").click()
    expect(block.get_by_test_id("code-copy")).to_have_attribute("data-label", "Copied")
    assert page.evaluate("navigator.clipboard.readText()") == "def add(a, b):\n    return a + b"
    message.get_by_test_id("copy").click()
    assert page.evaluate("navigator.clipboard.readText()") == MARKDOWN_ANSWER

    # XSS probes, streamed token by token: nothing unsafe enters the page at any moment, nothing runs
    page.evaluate("""(unsafe) => {
        window.__unsafe = [];
        const check = new Function('return ' + unsafe)();
        const t = document.getElementById('thread');
        new MutationObserver(() => {
            const answers = t.querySelectorAll('[data-testid=answer]');
            window.__unsafe.push(...check(answers[answers.length - 1]));
        }).observe(t, {subtree: true, childList: true, attributes: true, characterData: true});
    }""", UNSAFE_JS)
    probe = ask(page, "Now something hostile.", {"test_output": XSS_PROBES, "max_tokens": 600})
    answer = probe.get_by_test_id("answer")
    # the transcript followed the growing answer to its end
    assert page.get_by_test_id("transcript").evaluate("t => t.scrollHeight > t.clientHeight && t.scrollHeight - t.scrollTop - t.clientHeight < 2")
    expect(answer).to_contain_text("<script>window.__pwned=1</script>")  # shown as the text it is
    expect(answer).to_contain_text('<img src=x onerror="window.__pwned=2">')
    assert answer.evaluate(UNSAFE_JS) == []
    assert page.evaluate("window.__unsafe") == []
    expect(answer.get_by_test_id("code-block").locator("pre")).to_have_text("<script>window.__pwned=9</script>")
    for link in answer.locator("a").all():  # the links kept are inert: none navigates or runs anything
        assert link.get_attribute("href") is None or link.get_attribute("href").startswith("https://")
        link.click()
    page.wait_for_timeout(200)
    assert page.evaluate("window.__pwned") is None
    assert not dialogs and len(page.context.pages) == 1
    assert page.url == web_server.url + "/"



def test_conversations_survive_reload_regenerate_edit_and_the_demo_banner(page, web_server):
    log_in(page)
    expect(page.get_by_test_id("demo-banner")).to_be_hidden()  # the tiny checkpoint is not marked as demo weights
    ask(page, "First question", {"test_output": "**One**"})
    ask(page, "Second question", {"test_output": "Two."})
    expect(page.get_by_test_id("conversation")).to_have_count(1)
    expect(page.get_by_test_id("conversation-title")).to_have_text("First question")

    page.reload()
    expect(page.get_by_test_id("model-id")).to_have_text("tiny")  # the key is remembered too
    expect(page.get_by_test_id("user-text")).to_have_text(["First question", "Second question"])
    answers = page.get_by_test_id("answer")
    expect(answers).to_have_text(["One", "Two."])
    expect(answers.first.locator("strong")).to_have_text("One")  # rendered again from the stored Markdown
    expect(page.get_by_test_id("conversation")).to_have_attribute("aria-current", "true")

    # regenerate: only on the last answer; the old answer leaves the history
    regenerate = page.get_by_test_id("regenerate")
    expect(regenerate.first).to_be_hidden()
    page.route_log.inject = {"test_output": "Two, again."}
    regenerate.last.click()
    expect(page.get_by_test_id("assistant-message").last).to_have_attribute("data-state", "done")
    expect(answers).to_have_text(["One", "Two, again."])
    assert page.route_log.bodies[-1]["messages"] == [
        {"role": "user", "content": "First question"}, {"role": "assistant", "content": "**One**"},
        {"role": "user", "content": "Second question"}]

    # edit the first message and send it again: what came after it is replaced
    page.get_by_test_id("user-message").first.get_by_test_id("edit").click()
    page.get_by_test_id("edit-input").fill("First question, edited")
    page.route_log.inject = {"test_output": "Edited answer."}
    page.get_by_test_id("edit-send").click()
    expect(page.get_by_test_id("assistant-message")).to_have_count(1)
    expect(page.get_by_test_id("assistant-message")).to_have_attribute("data-state", "done")
    expect(page.get_by_test_id("user-text")).to_have_text(["First question, edited"])
    expect(answers).to_have_text(["Edited answer."])
    assert page.route_log.bodies[-1]["messages"] == [{"role": "user", "content": "First question, edited"}]

    # a second conversation; switch, rename, delete; all of it kept over a reload
    page.get_by_test_id("new-chat").click()
    expect(page.get_by_test_id("empty")).to_be_visible()
    ask(page, "Another topic", {"test_output": "Sure."})
    assert page.route_log.bodies[-1]["messages"] == [{"role": "user", "content": "Another topic"}]
    titles = page.get_by_test_id("conversation-title")
    expect(titles).to_have_text(["Another topic", "First question"])
    titles.nth(1).click()
    expect(page.get_by_test_id("user-text")).to_have_text(["First question, edited"])
    first = page.get_by_test_id("conversation").nth(1)
    first.get_by_test_id("rename").click()
    page.get_by_test_id("rename-input").fill("Renamed chat")
    page.get_by_test_id("rename-input").press("Enter")
    expect(titles).to_have_text(["Another topic", "Renamed chat"])
    page.reload()
    expect(titles).to_have_text(["Another topic", "Renamed chat"])
    expect(page.get_by_test_id("user-text")).to_have_text(["First question, edited"])  # still the open one
    other = page.get_by_test_id("conversation").first
    other.get_by_test_id("delete").click()
    expect(other.get_by_test_id("delete")).to_have_text("Delete?")  # asks first
    other.get_by_test_id("delete").click()
    expect(titles).to_have_text(["Renamed chat"])
    assert [c["title"] for c in stored_conversations(page)] == ["Renamed chat"]

    # favicon, and the demo-weights banner when /v1/models marks the weights as random
    icon = page.evaluate("""async () => { const href = document.querySelector('link[rel=icon]').href;
        const r = await fetch(href); return [new URL(href).pathname, r.status, r.headers.get('content-type')]; }""")
    assert icon == ["/web/favicon.svg", 200, "image/svg+xml"]

    expect(page.get_by_test_id("demo-banner")).to_be_hidden()
    web_server.llm.demo = True  # what a server on a demo checkpoint says in /v1/models
    try:
        page.reload()
        expect(page.get_by_test_id("demo-banner")).to_be_visible()
        expect(page.get_by_test_id("demo-banner")).to_contain_text("random-weight")
    finally:
        web_server.llm.demo = False  # the server fixture is shared by the module


def test_json_output_box_is_checked_and_sent(page, web_server):
    """The page's half of structured output: the schema box is checked before sending and goes as response_format;
    the answer shows as highlighted JSON. (The answer comes from a route: the server's half of it, constrained
    decoding, is for the structured-output tests.)"""
    log_in(page)
    expect(page.get_by_test_id("json-schema-box")).to_be_hidden()
    page.get_by_test_id("output-format").select_option("json")
    expect(page.get_by_test_id("json-schema-box")).to_be_visible()
    page.get_by_test_id("json-schema").fill('{"type": "object", "properties": {')
    page.get_by_test_id("prompt").fill("Total?")
    page.get_by_test_id("prompt").press("Enter")
    expect(page.get_by_test_id("error")).to_contain_text("The JSON schema is not valid JSON")
    page.get_by_test_id("json-schema").fill("[1, 2]")
    page.get_by_test_id("send").click()
    expect(page.get_by_test_id("error")).to_contain_text("must be a JSON object")
    expect(page.get_by_test_id("prompt")).to_have_value("Total?")
    assert page.route_log.bodies == [] and page.get_by_test_id("user-message").count() == 0

    schema = {"type": "object", "properties": {"total": {"type": "integer"}}, "required": ["total"]}
    page.get_by_test_id("json-schema").fill(json.dumps(schema))
    sent = []
    answer = '{"total": 42, "note": "<b>x</b>"}'

    def reply(route, request):
        sent.append(json.loads(request.post_data))
        events = [{"choices": [{"index": 0, "delta": {"content": answer[i:i + 5]}, "finish_reason": None}]} for i in range(0, len(answer), 5)]
        events.append({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
        route.fulfill(status=200, content_type="text/event-stream",
                      body="".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n")

    page.route("**/v1/chat/completions", reply)
    message = ask(page, "Total?")
    assert sent[-1]["response_format"] == {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}}
    shown = message.get_by_test_id("answer")
    assert json.loads(shown.text_content()) == json.loads(answer)  # shown as the JSON it is, not as Markdown
    expect(shown.locator(".hljs-attr").first).to_have_text('"total"')
    assert shown.locator("b").count() == 0
    page.get_by_test_id("json-schema").fill("")
    ask(page, "Anything?")
    assert sent[-1]["response_format"] == {"type": "json_object"}
    page.get_by_test_id("output-format").select_option("text")
    ask(page, "Free?")
    assert "response_format" not in sent[-1]


def test_full_browser_storage_keeps_the_text_and_says_so(page, web_server):
    """Pictures make conversations large: when localStorage refuses them, the text is kept, the page says the media
    are not kept, and after a reload the turn shows that instead of a picture (and is sent as its text)."""
    page.add_init_script("""(() => {
        const setItem = Storage.prototype.setItem;
        Storage.prototype.setItem = function (key, value) {
            if (String(value).length > 4000) throw new DOMException('quota', 'QuotaExceededError');
            return setItem.call(this, key, value);
        };
    })()""")
    page.reload()
    log_in(page)
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 48, 3), dtype=np.uint8))
    buf = io.BytesIO()
    noise.save(buf, format="PNG")
    page.get_by_test_id("image-input").set_input_files({"name": "noise.png", "mimeType": "image/png", "buffer": buf.getvalue()})
    ask(page, "What is this?", {"test_output": "Noise."})
    expect(page.get_by_test_id("error")).to_contain_text("pictures and videos are kept only until this page is closed")
    expect(page.get_by_test_id("user-message").locator("img")).to_have_count(1)  # still shown until the page closes
    page.reload()
    expect(page.get_by_test_id("media-not-kept")).to_have_text("image not kept (browser storage full)")
    expect(page.get_by_test_id("answer")).to_have_text("Noise.")
    ask(page, "And now?", {"test_output": "Still noise."})
    assert page.route_log.bodies[-1]["messages"][0] == {"role": "user", "content": "What is this?"}


def test_json_output_with_a_schema(page, web_server):
    web_server.llm.grammars.tokenizer  # built once per process (~3 s): `minicpmv serve` does it at start
    log_in(page)
    expect(page.get_by_test_id("json-schema-box")).to_be_hidden()
    page.get_by_test_id("output-format").select_option("json")
    expect(page.get_by_test_id("json-schema-box")).to_be_visible()
    schema = {"type": "object", "properties": {"total": {"type": "integer", "minimum": 0, "maximum": 99},
              "paid": {"type": "boolean"}}, "required": ["total", "paid"], "additionalProperties": False}
    page.get_by_test_id("json-schema").fill("{not json")
    page.get_by_test_id("prompt").fill("Total?")
    page.get_by_test_id("prompt").press("Enter")
    expect(page.get_by_test_id("error")).to_contain_text("JSON schema is not valid JSON")
    page.get_by_test_id("json-schema").fill(json.dumps(schema))
    message = ask(page, "Total?", {"temperature": 1.0, "seed": 4, "max_tokens": 40})
    answer = json.loads(message.get_by_test_id("answer").text_content())
    assert set(answer) == {"total", "paid"} and 0 <= answer["total"] <= 99 and isinstance(answer["paid"], bool)
    sent = page.route_log.bodies[-1]["response_format"]
    assert sent == {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}}
    page.get_by_test_id("json-schema").fill("")
    ask(page, "Anything?", {"max_tokens": 4})
    assert page.route_log.bodies[-1]["response_format"] == {"type": "json_object"}
    page.get_by_test_id("output-format").select_option("text")
    ask(page, "Free?", {"max_tokens": 2})
    assert "response_format" not in page.route_log.bodies[-1]
