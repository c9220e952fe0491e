"""offload-serve end to end: the official `openai` client against a live server on localhost (uvicorn on a
thread of this process, or the `offload-serve` command), on a tiny random checkpoint that chats.

Answers are checked against the Python API run on the same model (greedy): the server's conversation reuse
(prefix match, parking on disk and back) must give exactly what one Chat gives turn by turn."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

from offload import LLM
from offload.api import Session
from offload.config import OffloadConfig
from test_api_sessions import write_chat_checkpoint

openai = pytest.importorskip("openai")
KEY = "test-key"
CTX = 2048


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return write_chat_checkpoint(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def reference(model_path):
    return LLM(str(model_path), device="cpu", ctx=CTX, prefill_chunk=64)


@pytest.fixture(scope="module")
def server(model_path):
    from offload.server.app import create_app
    from offload.server.cli import Running, build_service
    # live=1: a second conversation parks the first on disk, so interleaving exercises the swap back
    # prefill_chunk 64: a prompt of a few hundred tokens prefills in many chunks, which a disconnect can cut
    service = build_service(OffloadConfig(model=str(model_path), device="cpu", ctx=CTX, prefill_chunk=64), max_tokens=1500,
                            max_body=64 << 10, queue=2, park_dir=None, park_mem=1 << 30, live=1, show_progress=False)
    running = Running(create_app(service, api_key=KEY))
    yield running, service
    running.stop()
    service.close()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0].url + "/v1", api_key=KEY, max_retries=0)


def _model(server) -> str:
    return server[1].served[0]


def _stats(server) -> dict:
    return httpx.get(server[0].url + "/stats", headers={"Authorization": f"Bearer {KEY}"}).json()


def test_chat_answers_equal_the_python_api_streamed_or_not(server, client, reference):
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "what is a tier"}]
    whole = client.chat.completions.create(model=_model(server), messages=msgs, max_tokens=12)
    chat = reference.chat(system="be brief")
    assert whole.choices[0].message.content == chat.send("what is a tier", max_tokens=12)
    assert whole.choices[0].finish_reason == "length" and whole.usage.completion_tokens == 12
    assert whole.usage.prompt_tokens == len(reference.tokenizer.encode_chat(
        *reference.tokenizer.render_chat(msgs, add_generation_prompt=True)))
    chunks = list(client.chat.completions.create(model=_model(server), messages=msgs, max_tokens=12, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 12
    chat.close()


def test_completions_streamed_or_not(server, client, reference):
    want = reference.generate("once upon a time", max_tokens=10)
    got = client.completions.create(model=_model(server), prompt="once upon a time", max_tokens=10)
    assert got.choices[0].text == want and got.object == "text_completion"
    pieces = [c.choices[0].text for c in client.completions.create(model=_model(server), prompt="once upon a time",
                                                                    max_tokens=10, stream=True)]
    assert "".join(pieces) == want
    stop = want[4:6]
    cut = client.completions.create(model=_model(server), prompt="once upon a time", max_tokens=10, stop=[stop])
    assert cut.choices[0].text == want[:want.index(stop)] and cut.choices[0].finish_reason == "stop"
    # every sampling field reaches the sampler: seeded draws equal the API's with the same SamplingParams (each
    # draw was checked to change when any one of its fields is left out)
    from offload import SamplingParams
    for fields in (dict(temperature=8.0, top_k=3, presence_penalty=0.5, repetition_penalty=1.1, seed=7),
                   dict(temperature=20.0, min_p=0.5, frequency_penalty=2.0, seed=7),
                   dict(temperature=30.0, top_p=0.3, seed=11)):
        openai_names = {k: v for k, v in fields.items() if k not in ("top_k", "min_p", "repetition_penalty")}
        extra = {k: v for k, v in fields.items() if k not in openai_names}
        drawn = client.completions.create(model=_model(server), prompt="sample me", max_tokens=16, extra_body=extra,
                                          **openai_names)
        assert drawn.choices[0].text == reference.generate("sample me", SamplingParams(max_tokens=16, **fields))


def test_two_conversations_interleaved_resume_their_kv(server, client, reference):
    """A and B alternate; each follow-up resumes its own conversation (B's turn parks A on disk, A's next turn
    loads it back) and prefills only the new turn, with the same answers as one Chat per conversation."""
    before = _stats(server)["prefix_cache"]
    chats = {"a": reference.chat(), "b": reference.chat()}
    history = {"a": [], "b": []}
    cached = []
    for turn, who in enumerate("abab"):
        question = f"question {turn} from {who}"
        history[who].append({"role": "user", "content": question})
        stream = turn == 2      # one follow-up streamed, the others whole
        reply = client.chat.completions.create(model=_model(server), messages=history[who], max_tokens=8,
                                               stream=stream, **({"stream_options": {"include_usage": True}}
                                                                 if stream else {}))
        if stream:
            chunks = list(reply)
            text, usage = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices), chunks[-1].usage
        else:
            text, usage = reply.choices[0].message.content, reply.usage
        assert text == chats[who].send(question, max_tokens=8)
        history[who].append({"role": "assistant", "content": text})
        cached.append(usage.prompt_tokens_details.cached_tokens)
    after = _stats(server)["prefix_cache"]
    assert cached[:2] == [0, 0] and cached[2] > 0 and cached[3] > 0
    assert after["hits"] - before["hits"] == 2 and after["resumed_from_disk"] - before["resumed_from_disk"] == 2
    # the resumed KV is exactly the conversation: the server's session tokens equal the Chat's
    _wait_idle(server)                                     # the last answer is kept once the worker is done
    live = [c for c in server[1].store._kept if c.session is not None]
    assert any(c.session.tokens == chats["b"].session.tokens for c in live)


def _slow_steps(monkeypatch, seconds=0.01):
    step = Session.step

    def slow(self, token_id):
        time.sleep(seconds)
        return step(self, token_id)
    monkeypatch.setattr(Session, "step", slow)


def _open_stream(server, max_tokens=1500):
    """A streamed chat request through httpx: (the client, the open response) once its first chunk came."""
    c = httpx.Client(timeout=30)
    body = {"model": _model(server), "messages": [{"role": "user", "content": "a long answer"}],
            "max_tokens": max_tokens, "stream": True}
    r = c.send(c.build_request("POST", server[0].url + "/v1/chat/completions", json=body,
                               headers={"Authorization": f"Bearer {KEY}"}), stream=True)
    lines = r.iter_lines()
    assert next(lines).startswith("data: ")
    return c, r, lines


def _wait_idle(server, timeout=30):
    end = time.monotonic() + timeout
    while _stats(server)["queue"]["admitted"] and time.monotonic() < end:
        time.sleep(0.05)


def test_a_client_that_disconnects_mid_stream_cancels_its_generation(server, client, monkeypatch):
    _slow_steps(monkeypatch)
    before = _stats(server)["queue"]["cancelled"]
    c, r, lines = _open_stream(server)
    for _ in range(3):
        next(lines)                       # a few tokens arrived: it is decoding
    r.close(), c.close()
    _wait_idle(server)
    st = _stats(server)
    assert st["queue"]["cancelled"] == before + 1 and st["queue"]["admitted"] == 0
    assert st["last_request"]["finish_reason"] == "cancelled" and st["last_request"]["completion_tokens"] < 1500
    ok = client.chat.completions.create(model=_model(server), messages=[{"role": "user", "content": "hi"}],
                                        max_tokens=3)
    assert ok.choices[0].finish_reason == "length"          # the server goes on


def test_a_client_that_gives_up_on_a_whole_answer_cancels_it(server, monkeypatch):
    _slow_steps(monkeypatch)
    before = _stats(server)["queue"]["cancelled"]
    body = {"model": _model(server), "messages": [{"role": "user", "content": "a long whole answer"}],
            "max_tokens": 1500}
    with pytest.raises(httpx.ReadTimeout):        # the client stops waiting and closes the connection
        httpx.post(server[0].url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"},
                   timeout=httpx.Timeout(30, read=1.0))
    _wait_idle(server)
    st = _stats(server)
    assert st["queue"]["cancelled"] == before + 1 and st["last_request"]["completion_tokens"] < 1500, json.dumps(st)


def test_a_client_that_disconnects_during_a_long_prefill_stops_it(server, client, monkeypatch):
    from offload.model.llama import LlamaModel
    layer_forward = LlamaModel.layer_forward

    inside = threading.Event()

    def slow(self, *a, **k):
        inside.set()
        time.sleep(0.05)
        return layer_forward(self, *a, **k)
    monkeypatch.setattr(LlamaModel, "layer_forward", slow)      # 1200 tokens: 19 chunks x 2 layers, ~2 s
    before = _stats(server)["queue"]["cancelled"]
    c = httpx.Client(timeout=30)
    body = {"model": _model(server), "messages": [{"role": "user", "content": "w" * 1200}], "stream": True}
    r = c.send(c.build_request("POST", server[0].url + "/v1/chat/completions", json=body,
                               headers={"Authorization": f"Bearer {KEY}"}), stream=True)
    assert next(r.iter_lines()).startswith("data: ")
    assert inside.wait(60)                # the worker is inside the prefill (a fixed sleep raced a loaded box)
    r.close(), c.close()
    _wait_idle(server)
    st = _stats(server)
    assert st["queue"]["cancelled"] == before + 1 and st["last_request"]["finish_reason"] == "cancelled in prefill"
    monkeypatch.undo()
    ok = client.chat.completions.create(model=_model(server), messages=[{"role": "user", "content": "w" * 1200}],
                                        max_tokens=2)
    assert ok.usage.prompt_tokens_details.cached_tokens == 0 and ok.choices[0].finish_reason == "length"


def test_queue_full_answers_429_with_retry_after_while_health_answers(server, monkeypatch):
    _slow_steps(monkeypatch)
    held = [_open_stream(server), _open_stream(server)]      # one decoding, one waiting: the line (2) is full
    try:
        assert httpx.get(server[0].url + "/health", timeout=5).json() == {"status": "ok"}   # the loop is free
        r = httpx.post(server[0].url + "/v1/completions", json={"model": _model(server), "prompt": "x"},
                       headers={"Authorization": f"Bearer {KEY}"})
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
        assert r.json()["error"]["type"] == "rate_limit_error" and r.json()["error"]["code"] == "queue_full"
    finally:
        for c, resp, _ in held:
            resp.close(), c.close()
    _wait_idle(server)
    assert _stats(server)["queue"]["rejected"] >= 1


@pytest.mark.parametrize("case, status, code, param", [
    ("malformed JSON", 400, "invalid_json", None),
    ("not an object", 400, "invalid_json", None),
    ("unknown model", 404, "model_not_found", "model"),
    ("negative max_tokens", 400, None, "max_tokens"),
    ("huge max_tokens", 400, None, "max_tokens"),
    ("bad temperature", 400, None, "temperature"),
    ("empty messages", 400, None, "messages"),
    ("prompt over ctx", 400, "context_length_exceeded", "messages"),
    ("wrong API key", 401, "invalid_api_key", None),
    ("no API key", 401, "invalid_api_key", None),
    ("oversize body", 413, "request_too_large", None),
    ("unknown route", 404, "not_found", None),
])
def test_bad_requests_get_an_openai_error_object(server, case, status, code, param):
    url, model = server[0].url + "/v1/chat/completions", _model(server)
    auth = {"Authorization": f"Bearer {KEY}"}
    good = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    body = {"malformed JSON": b'{"model": ', "not an object": b"[1, 2]",
            "unknown model": {**good, "model": "gpt-4o"}, "negative max_tokens": {**good, "max_tokens": -1},
            "huge max_tokens": {**good, "max_tokens": 10**9}, "bad temperature": {**good, "temperature": -1},
            "empty messages": {**good, "messages": []},
            "prompt over ctx": {**good, "messages": [{"role": "user", "content": "z" * (CTX + 10)}]},
            "wrong API key": good, "no API key": good, "unknown route": good,
            "oversize body": {**good, "messages": [{"role": "user", "content": "z" * (70 << 10)}]}}[case]
    headers = {} if case == "no API key" else {"Authorization": "Bearer nope"} if case == "wrong API key" else auth
    if case == "unknown route":
        url = server[0].url + "/v1/embeddings"
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(url, content=content, headers={**headers, "Content-Type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == code and err["param"] == param
    assert "\n" not in err["message"] and ";" in err["message"]         # one line: the problem; the fix
    ok = httpx.post(server[0].url + "/v1/chat/completions", json=good, headers=auth)   # the server goes on
    assert ok.status_code == 200


def test_bad_requests_lose_no_conversation(server, client, reference):
    chat = reference.chat()
    msgs = [{"role": "user", "content": "keep this conversation"}]
    first = client.chat.completions.create(model=_model(server), messages=msgs, max_tokens=6).choices[0].message
    assert first.content == chat.send("keep this conversation", max_tokens=6)
    msgs += [{"role": "assistant", "content": first.content}, {"role": "user", "content": "still there"}]
    auth = {"Authorization": f"Bearer {KEY}"}
    for body, headers in ((b"{", auth), (json.dumps({"model": "x", "messages": msgs}).encode(), auth),
                          (json.dumps({"model": _model(server), "messages": msgs, "max_tokens": -3}).encode(), auth),
                          (json.dumps({"model": _model(server), "messages": msgs}).encode(), {})):
        assert httpx.post(server[0].url + "/v1/chat/completions", content=body, headers=headers).status_code >= 400
    second = client.chat.completions.create(model=_model(server), messages=msgs, max_tokens=6)
    assert second.usage.prompt_tokens_details.cached_tokens > 0
    assert second.choices[0].message.content == chat.send("still there", max_tokens=6)
    chat.close()


def test_openai_client_errors_are_typed(server):
    wrong = openai.OpenAI(base_url=server[0].url + "/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    right = openai.OpenAI(base_url=server[0].url + "/v1", api_key=KEY, max_retries=0)
    assert [m.id for m in right.models.list()] == list(server[1].served)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        right.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError, match="over this server's limit"):
        right.completions.create(model=_model(server), prompt="x", max_tokens=100000)


def test_offload_serve_command(model_path, tmp_path):
    """The installed entry point: refuses a public bind without a key before loading, serves, exits on SIGTERM
    and removes its parked conversations."""
    cmd = [sys.executable, "-m", "offload.server.cli", "-m", str(model_path), "--device", "cpu", "--ctx", "512"]
    env = {**os.environ, "OFFLOAD_NO_PROGRESS": "1"}
    bad = subprocess.run(cmd + ["--host", "0.0.0.0"], capture_output=True, text=True, env=env, timeout=60)
    assert bad.returncode == 2 and bad.stderr.startswith("error: --host 0.0.0.0") and "--api-key" in bad.stderr
    port = 18000 + os.getpid() % 1000
    park = tmp_path / "park"
    proc = subprocess.Popen(cmd + ["--port", str(port), "--park-dir", str(park)], env=env, stderr=subprocess.PIPE,
                            text=True)
    try:
        assert "offload-serve | model" in proc.stderr.readline()
        end = time.monotonic() + 60
        while True:
            try:
                assert httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200
                break
            except httpx.ConnectError:
                assert time.monotonic() < end and proc.poll() is None
                time.sleep(0.1)
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        assert c.completions.create(model=str(model_path), prompt="hello", max_tokens=3).usage.completion_tokens == 3
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    assert not any(park.iterdir())


def test_store_parks_when_the_shared_budget_is_full_and_forgets_past_the_park_budget(model_path, tmp_path):
    """Conversations beyond what the tiers hold go to disk (the LLM refuses a session that does not fit beside
    the live ones); past the park budget the oldest parked ones are forgotten and simply prefilled again."""
    from offload.server.conversations import ConversationStore
    one = LLM(str(model_path), device="cpu", ctx=256).plan.gpu_bytes
    llm = LLM(str(model_path), device="cpu", ctx=256, gpu_mem=one + 1000, host_mem=0)   # room for one session
    store = ConversationStore(llm, tmp_path / "park", park_bytes=1 << 30, live_max=5)
    texts = {}
    for name in ("alpha", "beta"):
        sess, cached, reused = store.checkout("completion", name)
        assert (cached, reused) == ("", 0)
        ids = llm._encode(name)
        sess.prefill(ids)
        texts[name] = name
        store.checkin("completion", sess, name)
    st = store.stats()
    assert st["live"] == 1 and st["parked_now"] == 1 and st["parked"] == 1     # beta's session parked alpha
    sess, cached, reused = store.checkout("completion", "alpha and more")
    assert cached == "alpha" and reused == len(llm._encode("alpha")) and store.stats()["resumed_from_disk"] == 1
    assert sess.tokens == llm._encode("alpha")
    store.checkin("completion", sess, "alpha")
    store.park_bytes = 1                                   # now nothing fits on disk: parking forgets
    sess, _, _ = store.checkout("completion", "gamma")
    sess.prefill(llm._encode("gamma"))
    store.checkin("completion", sess, "gamma")
    st = store.stats()
    assert st["parked_now"] == 0 and st["forgotten"] >= 1 and st["parked_bytes"] == 0
    assert not any((tmp_path / "park").iterdir())
    store.close()
