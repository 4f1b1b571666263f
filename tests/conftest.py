"""Shared helpers and fixtures: the repository root, a closed port, tiny real checkpoints (random weights,
trained tokenizer) built once per test session, and real OpenAI-compatible HTTP servers on 127.0.0.1 that
play the simulated user (well, badly, or not at all)."""
import http.server
import json
import os
import re
import socket
import sys
import threading
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from model import make_tiny_checkpoint  # noqa: E402
from simulator import EMPTY_REPLY, Request, RulesBackend  # noqa: E402


def closed_port():
    """A port on 127.0.0.1 that nothing listens on (bound, read, closed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
    """model_type -> folder of a tiny HF checkpoint: qwen2 (tied, qkv bias), llama (llama3 rope), qwen3 (q/k norm)."""
    root = tmp_path_factory.mktemp("tiny")
    return {mt: make_tiny_checkpoint(str(root / mt), mt, seed=i) for i, mt in enumerate(["qwen2", "llama", "qwen3"])}


@pytest.fixture(scope="session")
def tiny_qwen2(tiny_checkpoints):
    return tiny_checkpoints["qwen2"]


@pytest.fixture
def one_thread():
    """In-process torch work on one thread: with 2 threads on a 2-core box that is busy with our subprocesses
    (or anything else) every op waits for a descheduled worker thread, ~5x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ----------------------------------------------------------------------------------------------------
# Reading a request back from its text, as an LLM does: the servers below play the rules user behind HTTP, and
# RulesBackend reads turn fields (simulator.Request), never the prompt. The headings are our templates'.

MODE_LINE = re.compile(r"^(?:Environment|环境): (\w+)\s*$", re.MULTILINE)
HIDDEN = re.compile(r"^## (?:What you truly need|你真正的需求)[^\n]*\n(.*?)(?=^## |\Z)", re.MULTILINE | re.DOTALL)
STEP_LINE = re.compile(r"^(?:Step|步骤): (\w+)\s*$", re.MULTILINE)
TURN = re.compile(r"^## (?:The supporter's latest reply|倾诉对象最新的回复)\n(.*)\n"
                  r"## (?:Your current emotion|你当前的情绪)\n(\d+)", re.MULTILINE | re.DOTALL)
RULES_MARK = re.compile(r"\[change ([+-]\d+), emotion (\d+)\]")   # in the rules' own analysis text


def read_request(messages):
    """The simulator.Request our templates rendered into these messages."""
    system, user = messages[0]["content"], messages[-1]["content"]
    step = STEP_LINE.search(user)
    fields = dict(stage=step.group(1) if step else "turn", mode=MODE_LINE.search(system).group(1),
                  lang="zh" if "环境:" in system else "en", need=HIDDEN.search(system).group(1))
    if fields["stage"] == "reply":   # written from the rules' own analysis: its change and the emotion after it
        change, after = map(int, RULES_MARK.search(user).groups())
        fields.update(change=change, emotion=after - change)
    elif fields["stage"] != "opening":
        reply, emotion = TURN.findall(user)[-1]
        fields.update(reply="" if reply.strip() == EMPTY_REPLY else reply.strip(), emotion=int(emotion))
    return Request(messages, **fields)


# ----------------------------------------------------------------------------------------------------
# Simulated-user servers: GET /v1/models and POST /v1/chat/completions on a free port of 127.0.0.1

def send_json(handler, body, status=200):
    """Answer an http.server request with a JSON body."""
    data = json.dumps(body).encode()
    handler.send_response(status)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(data)))
    handler.end_headers()
    handler.wfile.write(data)


class SimulatorServer:
    """
    A threaded OpenAI-compatible server whose good answers come from RulesBackend (so an episode played
    through it equals one played with RulesBackend directly). `plan` scripts the next POST answers; when it
    is empty, `default` applies. Actions:
      "ok"       the rules simulator's answer            "garbage"  200, but text that never parses
      "500"      HTTP 500                                "400"      HTTP 400 (a client error: not retried)
      "429"      HTTP 429 with Retry-After: `retry_after` (a string: seconds or an HTTP date)
      "slow"     sleep `slow_s`, then answer ok          "hang"     accept, read, never answer (until close)
      "echo401"  HTTP 401 echoing the Authorization header (to prove the client redacts the key)
    `refuse_marker`: a POST whose messages contain this text gets HTTP 400, whatever the plan says.
    Records: posts (headers, payload), post_times (time.monotonic() on arrival), gets, max_inflight.
    The key the fixtures put in $RLVER_TEST_KEY is `key`.
    """
    key = "sk-test-DO-NOT-LEAK-1234567890"

    def __init__(self, default="ok"):
        self.plan, self.default, self.slow_s, self.sleep_s, self.retry_after = [], default, 1.0, 0.0, "1"
        self.refuse_marker = None
        self.posts, self.post_times, self.gets, self.inflight, self.max_inflight = [], [], [], 0, 0
        self.lock, self.closing, rules, server = threading.Lock(), threading.Event(), RulesBackend(), self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def send(self, status, body, headers=()):
                data = json.dumps(body).encode() if not isinstance(body, bytes) else body
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for name, value in headers:
                    self.send_header(name, value)
                self.end_headers()
                try:
                    self.wfile.write(data)
                except OSError:
                    pass   # the client timed out and hung up

            def do_GET(self):
                server.gets.append(dict(self.headers))
                if self.headers.get("Authorization") == "Bearer wrong-key":
                    return self.send(401, {"error": f"bad key {self.headers['Authorization']}"})
                self.send(200, {"object": "list", "data": [{"id": "sim-model", "object": "model"}]})

            def do_POST(self):
                payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.posts.append((dict(self.headers), payload))
                    server.post_times.append(time.monotonic())
                    action = server.plan.pop(0) if server.plan else server.default
                    if server.refuse_marker and server.refuse_marker in json.dumps(payload, ensure_ascii=False):
                        action = "400"
                    server.inflight += 1
                    server.max_inflight = max(server.max_inflight, server.inflight)
                answered = []

                def send(*args):   # the request stops counting as in flight before its answer is written,
                    with server.lock:   # so a client's next request can never overlap it in the count
                        server.inflight -= 1
                    answered.append(True)
                    return self.send(*args)

                try:
                    time.sleep(server.sleep_s)
                    if action == "hang":
                        server.closing.wait()      # the connection stays open and silent until close()
                        return
                    if action in ("500", "400"):
                        return send(int(action), {"error": "overloaded" if action == "500" else "unknown model"})
                    if action == "429":
                        return send(429, {"error": "rate limited"}, [("Retry-After", server.retry_after)])
                    if action == "echo401":
                        return send(401, {"error": f"invalid header {self.headers.get('Authorization')}"})
                    if action == "slow":
                        time.sleep(server.slow_s)
                    content = ("I refuse to use your format." if action == "garbage"
                               else rules.answer(read_request(payload["messages"])))
                    send(200, {"choices": [{"index": 0, "message": {"role": "assistant", "content": content}}]})
                finally:
                    if not answered:
                        with server.lock:
                            server.inflight -= 1

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def close(self):
        self.closing.set()   # releases "hang" handlers
        self.httpd.shutdown()
        self.httpd.server_close()


def _serve(monkeypatch, default):
    """Start a SimulatorServer with the proxies off for 127.0.0.1 and the test key in $RLVER_TEST_KEY
    (subprocesses inherit both)."""
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("RLVER_TEST_KEY", SimulatorServer.key)
    return SimulatorServer(default)


@pytest.fixture
def simulator_server(monkeypatch):
    """A well-behaved simulated user (answers as RulesBackend); script failures through .plan / .default."""
    s = _serve(monkeypatch, "ok")
    yield s
    s.close()


@pytest.fixture
def garbage_simulator_server(monkeypatch):
    """A simulated user whose every answer ignores the <thought>/<change>/<reply> format."""
    s = _serve(monkeypatch, "garbage")
    yield s
    s.close()


@pytest.fixture
def hanging_simulator_server(monkeypatch):
    """A simulated user that accepts every chat request and never answers (GET /v1/models still works)."""
    s = _serve(monkeypatch, "hang")
    yield s
    s.close()
