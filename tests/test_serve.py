"""serve.py through the clients people use: the official `openai` package (streamed and not: the same text as
generation.generate for the same prompt and seed), a real headless Chromium on the chat page, 32 concurrent
streams (and the server's memory before and after), a client that hangs up mid-answer, and each bad request's
error object. One tiny model trained here, one server process (uvicorn on 127.0.0.1, a free port) for the
module, always stopped."""
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

import pytest
import torch

import chat
import train
from configurator import configure
from conftest import ROOT, TINY_TEST_MODEL
from generation import GenerationConfig, generate

httpx = pytest.importorskip("httpx")
API_KEY = "sk-test-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
BLOCK = 128     # the tiny model's context
FORMAT = "alpaca"   # the tokenizer has no padding rows for chatml's role tokens
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A tiny model trained here, 60 steps on the shipped sample with its 4,096-token tokenizer (seconds: gpt2's
    50,257-row output layer would make each step ~8x dearer). Its greedy answers are loose words (", the the"),
    but they are the model's own."""
    import prepare_fineweb
    tokenizer, data = os.path.join(ROOT, prepare_fineweb.SAMPLE_TOKENIZER), str(tmp_path_factory.mktemp("data"))
    prepare_fineweb.main(["--local", prepare_fineweb.SAMPLE, "--out_dir", data, "--tokenizer", tokenizer,
                          "--val_tokens", "10000", "--max_tokens", "100000", "--workers", "1"])
    out = tmp_path_factory.mktemp("serve_run")
    train.train(configure(train.DEFAULTS, TINY_TEST_MODEL + [
        f"--data_dir={data}", f"--out_dir={out}", f"--tokenizer={tokenizer}", "--vocab_size=4096",
        f"--block_size={BLOCK}", "--batch_size=2", "--max_iters=60", "--eval_interval=60", "--log_interval=20",
        "--learning_rate=1e-2", "--min_lr=1e-3"]))
    return str(out)


@pytest.fixture(scope="module")
def local(run_dir):
    """The same model in this process, loaded as serve.py loads it: the reference answers come from it."""
    model, fmt, _ = chat.load_chat(run_dir, FORMAT)
    return model, fmt


def reference(local, messages=None, prompt=None, max_tokens=24, temperature=0.0, top_p=1.0, seed=0):
    """generation.generate's answer as text: a chat (messages, FORMAT) or a plain completion (prompt)."""
    model, fmt = local
    if prompt is not None:
        fmt, messages = chat.ChatFormat("none", fmt.enc), [{"role": "user", "content": prompt}]
    ids, _ = fmt.render(messages, open_assistant=True)
    gen = GenerationConfig(max_new_tokens=max_tokens, temperature=temperature, top_p=top_p,
                           stop_ids=tuple(fmt.stop_ids))
    out = generate(model, ids, gen, fmt.allowed_mask(model.config.padded_vocab_size),
                   torch.Generator().manual_seed(seed))
    return fmt.decode(out[:-1] if out and out[-1] in fmt.stop_ids else out)


@dataclass
class Server:
    url: str
    name: str
    proc: subprocess.Popen
    log: str

    def answers(self):
        """The server log's one line per answer: (new tokens, finish reason)."""
        text = open(self.log).read()
        return [(int(n), why) for n, why in re.findall(r"answer: \d+ prompt \+ (\d+) new tokens .* finish: (\w+)", text)]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(run_dir, tmp_path_factory):
    """`python serve.py <run> --format alpaca --api_key ...` on a free port; stopped however the tests end."""
    port, log = free_port(), str(tmp_path_factory.mktemp("serve_log") / "serve.log")
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "serve.py"), run_dir, "--format", FORMAT,
                                 "--port", str(port), "--api_key", API_KEY], cwd=ROOT, stdout=f,
                                stderr=subprocess.STDOUT)
    url, deadline = f"http://127.0.0.1:{port}", time.time() + 120
    try:
        while True:  # ready when it answers /v1/models
            if proc.poll() is not None:
                pytest.fail(f"serve.py exited with {proc.returncode}:\n{open(log).read()[-3000:]}")
            try:
                if httpx.get(f"{url}/v1/models", headers=AUTH, timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.time() > deadline:
                pytest.fail(f"serve.py did not answer within 120 s:\n{open(log).read()[-3000:]}")
            time.sleep(0.2)
        yield Server(url, os.path.basename(run_dir), proc, log)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)


QUESTION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is the capital of France?"}]


# ---- the official client ------------------------------------------------------------------------------------
def test_openai_client_gets_generations_answer(server, local):
    from openai import OpenAI
    client = OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=60)
    assert [m.id for m in client.models.list().data] == [server.name]      # the run folder's name
    want = reference(local, QUESTION, max_tokens=24)
    assert want.strip()
    plain = client.chat.completions.create(model="tiny", messages=QUESTION, max_tokens=24, temperature=0, seed=7)
    assert plain.choices[0].message.content == want
    assert plain.choices[0].finish_reason in ("length", "stop") and plain.usage.completion_tokens <= 24
    chunks = list(client.chat.completions.create(model="tiny", messages=QUESTION, max_tokens=24, temperature=0,
                                                 seed=7, stream=True, stream_options={"include_usage": True}))
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert "".join(pieces) == want and len(pieces) > 1            # token by token, not one block at the end
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == plain.choices[0].finish_reason
    # sampling: temperature, top_p and the seed are honoured (same seed, same answer as generate)
    for seed in (7, 8):
        sampled = reference(local, QUESTION, max_tokens=24, temperature=0.9, top_p=0.9, seed=seed)
        got = client.chat.completions.create(model="tiny", messages=QUESTION, max_tokens=24, temperature=0.9,
                                             top_p=0.9, seed=seed)
        streamed = client.chat.completions.create(model="tiny", messages=QUESTION, max_tokens=24, temperature=0.9,
                                                  top_p=0.9, seed=seed, stream=True)
        assert got.choices[0].message.content == sampled
        assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == sampled
    assert reference(local, QUESTION, temperature=0.9, top_p=0.9, seed=7) != reference(
        local, QUESTION, temperature=0.9, top_p=0.9, seed=8)
    # plain completions, for base models
    prompt = "The cell membrane is"
    done = client.completions.create(model="tiny", prompt=prompt, max_tokens=16, temperature=0)
    assert done.choices[0].text == reference(local, prompt=prompt, max_tokens=16)
    streamed = client.completions.create(model="tiny", prompt=prompt, max_tokens=16, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == done.choices[0].text


def test_stop_strings_cut_the_answer_streamed_or_not(server, local):
    from openai import OpenAI
    client = OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=60)
    want = reference(local, QUESTION, max_tokens=24)
    stop = want[len(want) // 2:len(want) // 2 + 3]                   # three characters from the middle
    cut = want[:want.index(stop)]
    plain = client.chat.completions.create(model="tiny", messages=QUESTION, max_tokens=24, temperature=0,
                                           stop=[stop, "never appears"])
    assert plain.choices[0].message.content == cut and plain.choices[0].finish_reason == "stop"
    streamed = list(client.chat.completions.create(model="tiny", messages=QUESTION, max_tokens=24, temperature=0,
                                                   stop=stop, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == cut
    assert streamed[-1].choices[0].finish_reason == "stop"


# ---- bad requests ------------------------------------------------------------------------------------------
def test_each_bad_request_gets_its_error_and_the_server_keeps_serving(server, local):
    url = f"{server.url}/v1/chat/completions"
    long = "word " * 200
    n_long = len(local[1].render([{"role": "user", "content": long}], open_assistant=True)[0])
    n_short = len(local[1].render([{"role": "user", "content": "Hi"}], open_assistant=True)[0])
    hi = [{"role": "user", "content": "Hi"}]
    cases = [  # (body, headers, status, param, words in the message)
        (b'{"messages": [', AUTH, 400, None, "could not parse the JSON body"),
        (b"[1, 2]", AUTH, 400, None, "must be a JSON object"),
        ({"messages": hi, "temperature": "hot"}, AUTH, 400, "temperature", "valid number"),
        ({"messages": "Hi"}, AUTH, 400, "messages", "valid list"),
        ({"messages": [{"role": "user", "content": 5}]}, AUTH, 400, "messages.0.content", "valid string"),
        ({"messages": [{"role": "robot", "content": "x"}]}, AUTH, 400, "messages.0.role", "'user'"),
        ({"messages": [{"role": "assistant", "content": "x"}]}, AUTH, 400, "messages", "must follow a user"),
        ({"messages": []}, AUTH, 400, "messages", "at least 1 item"),
        ({}, AUTH, 400, "messages", "Missing required parameter"),
        ({"messages": hi, "temprature": 0.5}, AUTH, 400, "temprature", "Unrecognized request argument"),
        ({"messages": hi, "max_tokens": 0}, AUTH, 400, "max_tokens", "must be at least 1"),
        ({"messages": hi, "max_tokens": -5}, AUTH, 400, "max_tokens", "got -5"),
        ({"messages": hi, "max_tokens": 2.5}, AUTH, 400, "max_tokens", "valid integer"),
        ({"messages": hi, "stream": "yes"}, AUTH, 400, "stream", "valid boolean"),
        ({"messages": hi, "n": 2}, AUTH, 400, "n", "Input should be 1"),
        ({"messages": hi, "top_p": 0}, AUTH, 400, "top_p", "greater than 0"),
        ({"messages": hi, "stop": ["a", "b", "c", "d", "e"]}, AUTH, 400, "stop", "at most 4"),
        ({"messages": [{"role": "user", "content": long}]}, AUTH, 400, "messages",
         f"take {n_long}: {n_long - BLOCK + 1} tokens too many"),
        ({"messages": hi, "max_tokens": 500}, AUTH, 400, "max_tokens",
         f"asks for 500 more: {n_short + 500 - BLOCK} tokens too many"),
        ({"messages": hi}, {}, 401, None, "You didn't provide an API key"),
        ({"messages": hi}, {"Authorization": "Bearer wrong"}, 401, None, "Incorrect API key"),
    ]
    for body, headers, status, param, words in cases:
        kw = {"content": body} if isinstance(body, bytes) else {"json": body}
        r = httpx.post(url, headers={**headers, "Content-Type": "application/json"}, timeout=30, **kw)
        assert r.status_code == status, (body, r.text)
        error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and words in error["message"], (body, error)
        assert error["param"] == param, (body, error)
        ok = httpx.post(url, headers=AUTH, json={"messages": hi, "max_tokens": 2}, timeout=30)
        assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["role"] == "assistant"
    r = httpx.get(f"{server.url}/v1/nowhere", headers=AUTH, timeout=30)
    assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_url"
    r = httpx.post(f"{server.url}/v1/completions", headers=AUTH, json={"prompt": ["a", "b"]}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    assert server.proc.poll() is None
    assert "Traceback" not in open(server.log).read()


# ---- many clients, a client that leaves --------------------------------------------------------------------
def stream_chat(url, messages, max_tokens, results, i, **extra):
    """One streaming client: the answer's text, and whether the stream ended with [DONE]."""
    text, done = [], False
    with httpx.stream("POST", f"{url}/v1/chat/completions", headers=AUTH, timeout=120,
                      json={"messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True,
                            **extra}) as r:
        for line in r.iter_lines():
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: "):
                choices = json.loads(line[6:])["choices"]
                if choices:
                    text.append(choices[0]["delta"].get("content") or "")
    results[i] = ("".join(text), done)


def rss_mib(pid):
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(r"VmRSS:\s+(\d+) kB", f.read()).group(1)) / 1024


def wave(server, questions, max_tokens):
    results = [None] * len(questions)
    threads = [threading.Thread(target=stream_chat, args=(server.url, q, max_tokens, results, i))
               for i, q in enumerate(questions)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=180)
    assert not any(t.is_alive() for t in threads), "a client is still waiting after 180 s"
    return results


# The server's resident memory after 32 streams may exceed what it was after a warm-up wave by at most this
# (measured: +0.9 MiB). What a request allocates here is small and lives only while it runs (its KV cache: 2
# layers x k,v x 2 heads x 128 positions x 16 floats = 32 kB; fp32 logits of 4,096 rows, freed each step), and
# allocators keep some freed pages, hence a margin. 8 MiB fails when the requests leave something behind: the
# per-token logits kept alive (32 answers x 24 tokens x 16 kB = 12.6 MB), a copy of the weights per request.
RSS_TOLERANCE_MIB = 8


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the server's memory from /proc")
def test_32_concurrent_streams_all_complete_and_memory_returns(server, local):
    questions = [[{"role": "user", "content": f"Question {i}: what is {i} plus {i}?"}] for i in range(32)]
    wave(server, questions[:4], 24)                                  # warm-up: threads, caches, first allocations
    before = rss_mib(server.proc.pid)
    results = wave(server, questions, 24)
    for q, (text, done) in zip(questions, results):
        assert done and text == reference(local, q, max_tokens=24)
    time.sleep(0.5)
    after = rss_mib(server.proc.pid)
    print(f"server RSS: {before:.1f} MiB before 32 streams, {after:.1f} MiB after")
    assert after - before <= RSS_TOLERANCE_MIB, (before, after)
    assert server.proc.poll() is None


def test_a_client_that_hangs_up_frees_the_model(server):
    """Read two pieces of a long answer, then close the connection: the server stops decoding it (the log says
    'gone' after fewer tokens than asked) and answers the next request."""
    seen = len(server.answers())
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", headers=AUTH, timeout=60,
                      json={"messages": [{"role": "user", "content": "Tell me a story."}], "max_tokens": 64,
                            "min_tokens": 64, "temperature": 0, "stream": True}) as r:
        assert r.status_code == 200
        pieces = 0
        for line in r.iter_lines():
            pieces += '"content"' in line
            if pieces == 3:
                break
    deadline = time.time() + 30
    while len(server.answers()) == seen and time.time() < deadline:
        time.sleep(0.1)
    n, finish = server.answers()[seen]
    assert finish == "gone" and n < 64, (n, finish)
    ok = httpx.post(f"{server.url}/v1/chat/completions", headers=AUTH, timeout=30,
                    json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2})
    assert ok.status_code == 200


# ---- the chat page in a real browser -------------------------------------------------------------------------
def browser_or_skip(tmp_path):
    """Headless Chromium through chromedriver and Selenium, or a skip naming what is missing."""
    missing = [f"{name} (Debian: apt-get install chromium chromium-driver)"
               for name in ("chromium", "chromedriver") if not shutil.which(name)]
    try:
        from selenium import webdriver
    except ImportError:
        missing.append("selenium (pip install -r requirements.txt)")
    if missing:
        pytest.skip("the browser test needs " + ", ".join(missing))
    from selenium.webdriver.chrome.service import Service
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in CHROMIUM_FLAGS + [f"--user-data-dir={tmp_path / 'profile'}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    driver.set_page_load_timeout(60)
    driver.set_script_timeout(60)
    return driver


def test_chat_page_streams_the_answer_in_a_browser(server, local, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    driver = browser_or_skip(tmp_path)
    try:
        driver.get(f"{server.url}/")
        for field, value in (("api_key", API_KEY), ("temperature", "0"), ("max_tokens", "20")):
            box = driver.find_element(By.ID, field)
            box.clear()
            box.send_keys(value)
        messages = []
        for turn, question in enumerate(["What is the capital of France?", "And of Spain?"]):
            messages.append({"role": "user", "content": question})
            driver.find_element(By.ID, "message").send_keys(question)
            driver.find_element(By.ID, "send").click()
            WebDriverWait(driver, 60).until(
                lambda d: len(d.find_elements(By.CSS_SELECTOR, ".msg[data-done]")) == turn + 1)
            bubble = driver.find_elements(By.CSS_SELECTOR, ".msg[data-done]")[-1]
            text = bubble.get_property("textContent")
            assert "assistant" in bubble.get_attribute("class"), text       # not an error bubble
            assert text == reference(local, messages, max_tokens=20)
            assert int(bubble.get_attribute("data-chunks")) > 1             # it arrived piece by piece
            messages.append({"role": "assistant", "content": text})
        assert FORMAT in driver.find_element(By.ID, "model").text         # the page asked /v1/models
    finally:
        driver.quit()
