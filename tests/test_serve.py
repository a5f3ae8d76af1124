"""`safety-patch serve`: an OpenAI-compatible server on loopback, driven by the official `openai` client.

One tiny base (weights scaled so greedy answers vary), a gated patch, an ungated patch and a
stack of both, served from one process on 127.0.0.1 and a free port; every answer is compared
with the in-process reference (`patches.attached` + `generation.generate`, which `chat` runs).
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import torch

from safety_patch.cli import main
from safety_patch.errors import SafetyPatchError
from safety_patch.gate.probe import Gate, fit_gate, layer_states
from safety_patch.generation import GenerationConfig, generate, render
from safety_patch.models import load_model
from safety_patch.patches import attached, finalize_patch, read_patch
from safety_patch.serve.app import create_app
from safety_patch.serve.embedded import build_embedded, parse_stacks
from safety_patch.serve.protocol import ROUTE_HEADER, ServeConfig
from safety_patch.serve.server import make_server
from safety_patch.serve.upstream import UpstreamBackend, build_upstream
from safety_patch.testing import make_delta_patch, make_lora_patch, tiny_llama

HARM = ["How do I kill a Python process?", "kill the process with the id", "How do I kill it?", "kill kill kill"]
SAFE = ["The capital of France is Paris.", "What is the capital of Italy?", "Sure, here is a Python function.",
        "Rome is the capital of Italy."]
PROMPTS = HARM + SAFE
N = 8  # max_tokens of the compared answers
# ChatML that, like many real templates, rejects a conversation whose user/assistant turns do not alternate.
STRICT = (
    "{% set loop_messages = messages[1:] if messages[0]['role'] == 'system' else messages %}"
    "{% for m in loop_messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% endfor %}"
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def _user(t: str) -> list[dict]:
    return [{"role": "user", "content": t}]


class LiveServer:
    """uvicorn in a background thread on 127.0.0.1 and a port the OS picked; ``stop`` shuts it down."""

    def __init__(self, backend, config: ServeConfig):
        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(create_app(backend, config), log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        t0 = time.monotonic()
        while not self.server.started:
            assert time.monotonic() - t0 < 20 and self.thread.is_alive(), "server did not start"
            time.sleep(0.01)

    def client(self, **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0, timeout=60, **kw)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(20)
        assert not self.thread.is_alive()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Model folder, patches, stacks and the reference answers, built once."""
    root = tmp_path_factory.mktemp("serve")
    mp = pytest.MonkeyPatch()
    mp.setenv("SAFETY_PATCH_HOME", str(root / "home"))
    model, tok = tiny_llama(seed=0, layers=3)  # the gate reads layer 1: upstream mode loads 2 of 3 layers
    with torch.no_grad():  # a random tiny model repeats one token; larger weights make answers differ per prompt
        for p in model.parameters():
            if p.ndim == 2:
                p.mul_(20)
    tok.chat_template = STRICT
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    lm = load_model(str(root / "model"), device="cpu")
    fp = lm.fingerprint
    gated = make_lora_patch(lm.model, root / "safety", fp, seed=1, scale=0.5)
    gate, stats = fit_gate(lm.model, lm.tokenizer, [render(lm.tokenizer, _user(t)) for t in HARM],
                           [render(lm.tokenizer, _user(t)) for t in SAFE], 1, 0.0)
    gate.save(gated)
    finalize_patch(gated, "lora", {"name": "test", "fingerprint": fp}, method="lora", gate=stats)
    other = make_lora_patch(lm.model, root / "other", fp, seed=2, scale=0.5)
    ungated = make_lora_patch(lm.model, root / "safety-ungated", fp, seed=1, scale=0.5)  # the gated one's adapter
    delta = make_delta_patch(lm.model, root / "delta", fp, seed=3, scale=0.2)  # full-weight: added in place
    stacks = {"safety": [str(gated)], "other": [str(other)], "combo": [str(other), str(gated)], "delta": [str(delta)]}
    cfg = GenerationConfig(max_new_tokens=N, batch_size=1)
    convs = [_user(t) for t in PROMPTS]
    ref = {"base": generate(lm.model, lm.tokenizer, convs, cfg)}
    for name, paths in stacks.items():
        with attached(lm.model, [read_patch(p) for p in paths], fp) as m:
            ref[name] = generate(m, lm.tokenizer, convs, cfg)
    ids = [lm.tokenizer(render(lm.tokenizer, c), add_special_tokens=False)["input_ids"] for c in convs]
    logits = Gate.load(gated).scores(layer_states(lm.model, lm.tokenizer, ids, [1])[1]).tolist()
    yield {"root": root, "model": str(root / "model"), "stacks": stacks, "ref": ref, "logits": logits, "gated": gated,
           "ungated": ungated}
    mp.undo()


@pytest.fixture(scope="module")
def live(world):
    backend = build_embedded(world["model"], world["stacks"], device="cpu", window_ms=15, max_batch=8)
    audit = world["root"] / "audit.jsonl"
    srv = LiveServer(backend, ServeConfig(default_max_tokens=N, max_tokens_limit=450, audit_path=str(audit)))
    srv.audit, srv.backend = audit, backend
    yield srv
    srv.stop()


def _stoppable(app, shutdown_timeout: float):
    """``make_server``'s server (as ``serve`` runs it) for ``app`` in a thread on a free port: (server, thread, url)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    server = make_server(app, "127.0.0.1", 0, shutdown_timeout=shutdown_timeout)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    return server, thread, f"http://127.0.0.1:{sock.getsockname()[1]}"


def _audit(srv) -> list[dict]:
    return [json.loads(line) for line in Path(srv.audit).read_text().splitlines()]


def test_reference_is_a_real_test(world):
    """The fixture's answers differ per prompt and per stack, and the gate splits the prompts."""
    ref = world["ref"]
    assert len(set(ref["base"])) > 4 and all(ref["base"])
    assert ref["safety"] != ref["base"] and ref["other"] != ref["base"] and ref["combo"] != ref["other"]
    assert ref["delta"] != ref["base"]
    fired = [lg > 0 for lg in world["logits"]]
    assert any(fired) and not all(fired)


def test_models_and_health(live):
    c = live.client()
    models = c.models.list()
    assert [m.id for m in models] == ["base", "safety", "other", "combo", "delta"]
    # each model names its patches by path and by id (a folder's name or path is not an identity)
    for m in models:
        facts = m.model_extra["safety_patch"]
        assert facts["patch_ids"] == [read_patch(p).id for p in facts["patches"]], m.id
    h = httpx.get(live.url + "/health").json()
    assert h["status"] == "ok" and h["mode"] == "embedded"


def test_routing_and_tokens_match_chat(world, live):
    """Each greedy answer equals the reference; the route says which patches ran and the gate's logit."""
    c = live.client()
    for name in ("base", "safety", "other", "combo", "delta"):
        # every prompt for the gated stacks; the load test below covers the others on every prompt
        for i in range(0, len(PROMPTS), 1 if name in ("safety", "combo") else 3):
            prompt = PROMPTS[i]
            raw = c.chat.completions.with_raw_response.create(model=name, messages=_user(prompt), max_tokens=N)
            r = raw.parse()
            assert r.choices[0].message.content == world["ref"][name][i], (name, prompt)
            route = r.model_extra["safety_patch"]
            header = raw.headers[ROUTE_HEADER]
            if name in ("safety", "combo"):
                (g,) = route["gates"]
                fired = g["logit"] > 0
                if name == "safety":  # in "combo" the gate reads with the ungated "other" on
                    assert abs(g["logit"] - world["logits"][i]) < 1e-3
                assert g["patch"] == "safety" and g["fired"] == fired
                # "combo"'s always-on "other" answers when the gate does not fire: not the base's weights
                unfired = "always" if name == "combo" else "base"
                assert route["decision"] == ("patched" if fired else unfired) and f"fired={int(fired)}" in header
                assert header.startswith(f"decision={route['decision']}")
                assert ("safety" in route["active_patches"]) == fired
                assert ("other" in route["active_patches"]) == (name == "combo")
                ids = {f: read_patch(world["root"] / f).id for f in ("safety", "other")}
                assert g["patch_id"] == ids["safety"]
                assert route["active_patch_ids"] == [ids[f] for f in route["active_patches"]]
            else:
                assert route["gates"] == [] and route["decision"] == ("base" if name == "base" else "always")
            assert r.usage.completion_tokens <= N and r.choices[0].finish_reason in ("stop", "length")


def test_cli_chat_prints_what_the_server_answers(world, live, capsys):
    c = live.client()
    for prompt in (HARM[0], SAFE[1]):  # one the gate sends to the patch, one it does not
        assert main(["chat", "--model", world["model"], "--patch", str(world["gated"]), "--prompt", prompt,
                     "--max-new-tokens", str(N)]) == 0
        out, err = capsys.readouterr()
        served = c.chat.completions.create(model="safety", messages=_user(prompt), max_tokens=N)
        assert served.choices[0].message.content == out.strip()
        # chat says on stderr where the gate sent the turn, as the server's body does
        (gate,) = served.model_extra["safety_patch"]["gates"]
        (route,) = [x for x in err.splitlines() if x.startswith("[route] ")]
        assert route.startswith(f"[route] {world['gated']}: {'adapter' if gate['fired'] else 'base'} "
                                f"(gate logit {gate['logit']:+.2f}, threshold {gate['threshold']:+.2f})"), route


def test_streaming_equals_the_whole_answer(world, live):
    c = live.client()
    for i in (0, 5):
        with c.chat.completions.with_streaming_response.create(
                model="safety", messages=_user(PROMPTS[i]), max_tokens=N, stream=True,
                stream_options={"include_usage": True}) as resp:
            assert "fired=" in resp.headers[ROUTE_HEADER]
            chunks = list(resp.parse())
        first = chunks[0]
        assert first.model_extra["safety_patch"]["gates"][0]["fired"] == (world["logits"][i] > 0)
        text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
        assert text == world["ref"]["safety"][i]
        assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] in ("stop", "length")
        assert chunks[-1].usage.completion_tokens >= 1 and chunks[-1].usage.prompt_tokens > 10


def test_bad_requests_get_openai_errors(live):
    url = live.url + "/v1/chat/completions"
    ok = {"model": "safety", "messages": _user("hi")}
    cases = [
        (b"{not json", 400, None),
        (b"[1, 2]", 400, None),
        # a repeated key was read as its last value (a user's trial): a proxy reading the first saw another model
        (b'{"model": "safety", "model": "base", "messages": [{"role": "user", "content": "hi"}]}', 400, None),
        ({"model": "nope", "messages": _user("hi")}, 404, "model"),
        ({"model": "safety"}, 400, "messages"),
        ({"model": "safety", "messages": []}, 400, "messages"),
        ({**ok, "messages": [{"role": "tool", "content": "x"}]}, 400, None),
        ({**ok, "messages": [{"role": "user"}]}, 400, None),
        ({**ok, "messages": _user("a") + [{"role": "assistant", "content": "b"}]}, 400, "messages"),
        ({**ok, "messages": _user("a") + _user("b")}, 400, "messages"),  # the template rejects it
        ({**ok, "max_tokens": 0}, 400, "max_tokens"),
        ({**ok, "max_tokens": -3}, 400, "max_tokens"),
        ({**ok, "max_tokens": 451}, 400, "max_tokens"),
        ({**ok, "max_completion_tokens": 0}, 400, "max_completion_tokens"),
        ({**ok, "max_tokens": "many"}, 400, None),
        ({**ok, "max_tokens": True}, 400, "max_tokens"),  # not read as 1 (pydantic's lax mode)
        ({**ok, "max_tokens": "5"}, 400, "max_tokens"),  # nor a string as a number
        ({**ok, "max_tokens": 5.5}, 400, "max_tokens"),
        ({**ok, "stream": "yes"}, 400, "stream"),
        ({**ok, "messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content"),
        ({**ok, "messages": _user("kill " * 5000)}, 400, "messages"),  # over the 4096-token context
        ({**ok, "temperature": 7}, 400, None),
        ({**ok, "seed": 10**20}, 400, None),  # over what torch.Generator.manual_seed takes
        (b'{"model": "safety", "messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', 400, None),
        ({**ok, "n": 2}, 400, "n"), ({**ok, "n": 0}, 400, "n"),
        ({**ok, "stop": ["x"]}, 400, "stop"),
        # fields OpenAI's chat API does not have were silently ignored (a user's trial, session 33)
        ({**ok, "best_of": 3}, 400, "best_of"), ({**ok, "echo": True}, 400, "echo"),
        ({**ok, "unknown_field": 5}, 400, "unknown_field"), ({**ok, "store": True}, 400, "store"),
        # found by a user's trial: each once a 500 (the first two unaudited) or silently ignored
        ({**ok, "messages": [{"role": "user", "content": "a\ud800b"}]}, 400, "messages[0].content"),
        (b'{"model": "safety", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", 400, None),
        ({**ok, "temperature": 1e-300}, 400, "temperature"),
        ({**ok, "frequency_penalty": 0.5}, 400, "frequency_penalty"),
        ({**ok, "logit_bias": {"50256": -100}}, 400, "logit_bias"),
        ({**ok, "response_format": {"type": "json_object"}}, 400, "response_format"),
        ({**ok, "tool_choice": "auto"}, 400, "tool_choice"),
        ({**ok, "top_k": 5}, 400, "top_k"),
        ({**ok, "stream": True, "stream_options": {"include_usage": "yes"}}, 400, "stream_options.include_usage"),
        ({**ok, "stream_options": {"include_usage": True}}, 400, "stream_options"),
    ]
    for body, status, param in cases:
        r = httpx.post(url, content=body if isinstance(body, bytes) else json.dumps(body),
                       headers={"content-type": "application/json"}, timeout=30)
        assert r.status_code == status, (body, r.text)
        err = r.json()["error"]
        assert isinstance(err["message"], str) and err["message"] and "Traceback" not in r.text
        assert err["type"] == "invalid_request_error"
        if param:
            assert err["param"] == param, (body, err)
    assert httpx.get(live.url + "/v1/nothing").json()["error"]["code"] == "not_found"
    c = live.client()
    with pytest.raises(openai.BadRequestError, match="context length"):
        c.chat.completions.create(model="base", messages=_user("kill " * 5000))
    with pytest.raises(openai.NotFoundError):
        c.chat.completions.create(model="gpt-4", messages=_user("hi"))
    assert c.chat.completions.create(model="base", messages=_user("hi"), max_tokens=2).choices[0].finish_reason
    sampled = c.chat.completions.create(model="safety", messages=_user("hi"), max_tokens=4, temperature=0.8, seed=3)
    assert sampled.usage.completion_tokens >= 1
    union = httpx.post(url, json={**ok, "messages": [{"role": "user", "content": 5}]}, timeout=30).json()["error"]
    assert union["message"] == "messages[0].content: must be one of str | list[TextPart] (got int)"
    assert httpx.post(url, json={**ok, "n": 2}, timeout=30).json()["error"]["code"] == "unsupported_parameter"
    for body, says in [({}, "missing required fields 'model', 'messages'"),
                       ({**ok, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
                        "messages[0].content[0].type: Input should be 'text'"),
                       ({**ok, "messages": [{"role": "user", "content": [{"type": "text"}]}]},
                        "messages[0].content[0].text: Field required")]:
        assert httpx.post(url, json=body, timeout=30).json()["error"]["message"] == says, body
    assert c.chat.completions.create(model="base", messages=_user("hi"), max_tokens=2, temperature=0).choices[0]
    nan = httpx.post(url, content=b'{"model": "safety", "messages": [{"role": "user", "content": "hi"}], "top_p": NaN}',
                     headers={"content-type": "application/json"}, timeout=30)
    assert nan.status_code == 400 and "finite" in nan.json()["error"]["message"]
    # unseeded sampled requests sample anew, each with a seed drawn and logged that reproduces its answer
    texts = [c.chat.completions.create(model="base", messages=_user("tell me"), max_tokens=6, temperature=1.0)
             .choices[0].message.content for _ in range(2)]
    logged = [r for r in _audit(live) if r.get("model") == "base" and r.get("temperature") == 1.0][-2:]
    assert len(logged) == 2 and logged[0]["seed"] != logged[1]["seed"]
    again = c.chat.completions.create(model="base", messages=_user("tell me"), max_tokens=6, temperature=1.0,
                                      seed=logged[1]["seed"]).choices[0].message.content
    assert again == texts[1]
    # neutral values of the unsupported fields are what OpenAI does without them: accepted
    assert httpx.post(url, json={**ok, "max_tokens": 2, "frequency_penalty": 0, "logit_bias": {},
                                 "response_format": {"type": "text"}, "store": False, "metadata": {"a": "b"},
                                 "service_tier": "auto", "user": "u1"}, timeout=30).status_code == 200
    # every rejected request has its audit line, the bodies above included
    statuses = [r["status"] for r in _audit(live)]
    assert statuses.count(400) >= len([c for c in cases if c[1] == 400])


def test_an_internal_error_is_a_json_500_and_audited(world, live, monkeypatch):
    """A bug (here: the backend's prompt preparation raising) is answered in the OpenAI shape and
    written to the audit log like every other request (it once reached only the server log)."""
    def boom(messages):
        raise RuntimeError("a bug")

    monkeypatch.setattr(live.backend, "prepare", boom)
    before = len(_audit(live))
    r = httpx.post(live.url + "/v1/chat/completions", json={"model": "safety", "messages": _user("hi")}, timeout=30)
    assert r.status_code == 500 and r.json()["error"]["message"] == "internal error (RuntimeError)"
    lines = _audit(live)[before:]
    assert [(x["status"], x["error"]) for x in lines] == [(500, "internal error (RuntimeError)")]


def test_load_64_requests_8_clients_batched_no_leaks(world, live):
    """64 requests from 8 concurrent clients over all stacks: every answer complete and equal to its
    own stack's reference (no adapter leaks between requests batched together), one audit line each."""
    before = {r["id"] for r in _audit(live)}
    batches0 = httpx.get(live.url + "/health").json()["batches"]
    names = ["base", "safety", "other", "combo", "delta"]

    def client_run(k: int) -> list[tuple]:
        c = live.client()
        out = []
        for j in range(8):
            name, i = names[(k + j) % len(names)], (3 * k + j) % len(PROMPTS)
            if j % 2:
                chunks = list(c.chat.completions.create(model=name, messages=_user(PROMPTS[i]), max_tokens=N, stream=True))
                text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
                out.append((name, i, text, chunks[-1].choices[0].finish_reason, chunks[0].id))
            else:
                r = c.chat.completions.create(model=name, messages=_user(PROMPTS[i]), max_tokens=N)
                out.append((name, i, r.choices[0].message.content, r.choices[0].finish_reason, r.id))
        return out

    with ThreadPoolExecutor(8) as ex:
        results = [x for part in ex.map(client_run, range(8)) for x in part]
    assert len(results) == 64
    for name, i, text, reason, _ in results:
        assert reason in ("stop", "length")
        assert text == world["ref"][name][i], (name, PROMPTS[i])
    ids = [r[4] for r in results]
    lines = [r for r in _audit(live) if r["id"] not in before]
    assert sorted(r["id"] for r in lines) == sorted(ids) and len(set(ids)) == 64
    assert all(r["status"] == 200 and r["completion_tokens"] >= 1 and "messages" not in r for r in lines)
    # the audit names the patches that answered by id too: a folder's name can be shared
    stack_ids = {n: [read_patch(p).id for p in ps] for n, ps in world["stacks"].items()} | {"base": []}
    assert all(set(r["active_patch_ids"]) <= set(stack_ids[r["model"]]) for r in lines)
    assert any(r["active_patch_ids"] for r in lines)
    assert not any(PROMPTS[0] in json.dumps(r) for r in lines)  # no prompt text without --log-prompts
    batches = httpx.get(live.url + "/health").json()["batches"] - batches0
    assert batches < 64  # concurrent requests shared batches


def test_client_disconnect_mid_stream_frees_its_slot(world, live):
    body = {"model": "base", "messages": _user(SAFE[1]), "max_tokens": 440, "stream": True}
    with httpx.Client(timeout=30) as h, h.stream("POST", live.url + "/v1/chat/completions", json=body) as r:
        for line in r.iter_lines():
            if line.startswith("data:") and '"content": "' in line and '"content": ""' not in line:
                rid = json.loads(line[5:])["id"]
                break
    t0 = time.monotonic()
    while True:  # the row stops at the next step and the worker is free again
        h = httpx.get(live.url + "/health").json()
        if h["running"] == 0 and h["queued"] == 0:
            break
        assert time.monotonic() - t0 < 10, h
        time.sleep(0.02)
    t0 = time.monotonic()
    while not [x for x in _audit(live) if x["id"] == rid]:
        assert time.monotonic() - t0 < 10
        time.sleep(0.02)
    (line,) = [x for x in _audit(live) if x["id"] == rid]
    assert line["finish_reason"] == "cancelled" and line["completion_tokens"] < 440
    # a non-streaming request whose client gives up is cancelled too. Each decoding step is slowed
    # to >= 5 ms, so the 440 tokens take >= 2.2 s, well past the client's 0.3 s and the server's
    # disconnect poll: on a fast machine the tiny model wrote all 440 first (finish "length").
    hook = live.backend.engine.base_model.model.layers[0].register_forward_pre_hook(lambda *_: time.sleep(0.005))
    try:
        n0 = len(_audit(live))
        with pytest.raises(httpx.TimeoutException):
            httpx.post(live.url + "/v1/chat/completions", json={**body, "stream": False}, timeout=0.3)
        t0 = time.monotonic()
        while len(_audit(live)) == n0:
            assert time.monotonic() - t0 < 10
            time.sleep(0.05)
        last = _audit(live)[-1]
        assert last["finish_reason"] == "cancelled" and httpx.get(live.url + "/health").json()["running"] == 0
        assert time.monotonic() - t0 < 1.0  # cancelled mid-answer, not when the 440 tokens were done (>= 1.9 s)
    finally:
        hook.remove()
    # a user's trial: a client gone while its body was still arriving was audited 500 "internal error
    # (ClientDisconnect)" with a traceback; it is a client that left (499)
    n0 = len(_audit(live))
    host, port = live.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as raw:
        raw.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"model\"")
    t0 = time.monotonic()
    while len(_audit(live)) == n0:
        assert time.monotonic() - t0 < 10
        time.sleep(0.05)
    last = _audit(live)[-1]
    assert (last["status"], last["error"], last["finish_reason"]) == (499, "client disconnected", "cancelled")
    # the server still answers afterwards
    assert live.client().chat.completions.create(model="base", messages=_user(SAFE[1]), max_tokens=N
                                                 ).choices[0].message.content == world["ref"]["base"][5]


def test_a_stop_signal_lets_answers_finish_then_cuts_them_as_the_servers_doing(world, live, tmp_path):
    """Found by a user's trial: SIGTERM (docker stop, systemd) cut a stream after 5 s with no event,
    audited it as "client disconnected" (499), logged a traceback, and the process died with 143.
    Now the app knows it is stopping: an answer cut past the grace period is audited as 503
    "server shutting down"; and the command, stopped by SIGTERM, says done and exits 0."""
    import signal
    import subprocess
    import sys

    audit = tmp_path / "audit.jsonl"
    app = create_app(live.backend, ServeConfig(max_tokens_limit=450, audit_path=str(audit)))
    server, thread, url = _stoppable(app, 0.2)
    hook = live.backend.engine.base_model.model.layers[0].register_forward_pre_hook(lambda *_: time.sleep(0.005))
    try:
        body = {"model": "base", "messages": _user(SAFE[1]), "max_tokens": 440, "stream": True}
        with httpx.Client(timeout=30) as h, h.stream("POST", url + "/v1/chat/completions", json=body) as r:
            lines = r.iter_lines()
            next(line for line in lines if line.startswith("data:"))
            server.handle_exit(signal.SIGTERM, None)  # as the signal handler calls it
            # cut before the grace period (0.2 s; >= 2.2 s of answer left) ends, by the app: an error event in
            # the API's shape, not a connection dropped without one (a user's trial, session 33)
            rest = [json.loads(x[5:]) for x in lines if x.startswith("data:") and x[5:].strip() != "[DONE]"]
        assert rest and rest[-1]["error"]["message"] == "server shutting down"
        thread.join(20)
        assert not thread.is_alive()
    finally:
        hook.remove()
    (line,) = [json.loads(x) for x in audit.read_text().splitlines()]
    assert (line["status"], line["error"], line["finish_reason"]) == (503, "server shutting down", "cancelled")
    # the command itself: SIGTERM is a normal stop (exit 0, its summary line, no traceback)
    proc = subprocess.Popen([str(Path(sys.executable).parent / "safety-patch"), "serve", "--model", world["model"], "--port", "0",
                             "--audit-log", str(tmp_path / "a2.jsonl"), "--patch", str(world["gated"])],
                            stderr=subprocess.PIPE, text=True,
                            env={**__import__("os").environ, "SAFETY_PATCH_ALLOCATOR": "system"})
    err = ""
    for err_line in proc.stderr:  # wait until it listens
        err += err_line
        if "[serve] models:" in err_line:
            break
    # what the gate was measured to route is said before it serves (a user's trial: a quick-size gate served silently)
    from safety_patch.patches import read_patch
    from safety_patch.patches.folder import gate_summary

    line, *warnings = gate_summary(read_patch(world['gated']).meta['gate'])
    assert f"[serve] safety: the gate of {world['gated']}: {line}\n" in err
    assert all(f"[serve] safety: {w}\n" in err for w in warnings)
    base = err.split("http://", 1)[1].split("/v1", 1)[0]
    t0 = time.monotonic()
    while True:  # the line comes before uvicorn listens (and installs its signal handlers)
        try:
            if httpx.get(f"http://{base}/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert time.monotonic() - t0 < 30 and proc.poll() is None
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    rest = proc.communicate(timeout=60)[1]
    assert proc.returncode == 0, err + rest
    assert "Traceback" not in rest and "[serve] done" in rest, rest


def test_stack_names_from_flags(world, tmp_path, capsys):
    assert parse_stacks([str(world["gated"])], ["both=a,b"]) == {"safety": [str(world["gated"])], "both": ["a", "b"]}
    # a link is named as given, the name the patch's routes carry (a user's trial: the model was the
    # link's target's name, the gate readings the link's), and a trailing slash or "." names the folder
    from safety_patch.patches import read_patch

    link = tmp_path / "patches" / "mine"
    link.parent.mkdir()
    link.symlink_to(world["gated"], target_is_directory=True)
    assert parse_stacks([str(link)], None) == {"mine": [str(link)]} == {read_patch(link).name: [str(link)]}
    assert list(parse_stacks([str(world["gated"]) + "/"], None)) == ["safety"]
    with contextlib.chdir(world["gated"]):
        assert list(parse_stacks(["."], None)) == ["safety"] == [read_patch(".").name]
    assert main(["serve", "--model", world["model"], "--stack", "base=" + str(world["gated"])]) == 2
    assert main(["serve", "--model", world["model"], "--stack", "nothing"]) == 2
    assert main(["serve", "--model", world["model"], "--patch", str(tmp_path / "missing")]) == 2
    # an audit log that cannot be opened is said before the server announces its URL (a user's trial),
    # and a start that fails later leaves no empty log behind
    capsys.readouterr()
    assert main(["serve", "--model", world["model"], "--port", "0", "--audit-log", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "cannot open the audit log" in err and "[serve] models:" not in err
    (tmp_path / "f").write_text("")
    assert main(["serve", "--model", world["model"], "--port", "0", "--audit-log", str(tmp_path / "f" / "a.jsonl")]) == 2
    assert "cannot open the audit log" in capsys.readouterr().err
    log = tmp_path / "new" / "dir" / "a.jsonl"
    assert main(["serve", "--model", world["model"], "--patch", str(tmp_path / "missing"), "--audit-log", str(log)]) == 2
    assert not (tmp_path / "new").exists()
    with socket.socket() as busy:  # a port in use: one line and exit code 2, before the model loads
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        assert main(["serve", "--model", world["model"], "--port", str(busy.getsockname()[1])]) == 2


# ----------------------------------------------------------------------------- upstream mode


@pytest.fixture(scope="module")
def upstream(world):
    """A stand-in for `vllm serve BASE --enable-lora --lora-modules safety=P` (our own server with the gated
    patch's adapter always on under the name "safety"), and a gate-only front server forwarding to it."""
    root = world["root"]
    standin = LiveServer(build_embedded(world["model"], {"safety": [str(world["ungated"])]}, device="cpu"),
                         ServeConfig(max_tokens_limit=450, audit_path=str(root / "standin.jsonl")))
    standin.audit = root / "standin.jsonl"
    backend = build_upstream(world["model"], {"safety": [str(world["gated"])]}, standin.url, "base", device="cpu")
    front = LiveServer(backend, ServeConfig(max_tokens_limit=450, audit_path=str(root / "front.jsonl")))
    front.audit = root / "front.jsonl"
    yield standin, front, backend
    front.stop()
    standin.stop()


def test_upstream_mode_routes_by_the_local_truncated_gate(world, upstream):
    standin, front, backend = upstream
    assert (backend.probe.layers_loaded, backend.probe.layers_total) == (2, 3)
    assert len(backend.probe.model.layers) == 2 and not hasattr(backend.probe.model, "lm_head")
    c = front.client()
    assert [m.id for m in c.models.list()] == ["base", "safety"]
    n0 = len(_audit(standin))
    for i, prompt in enumerate(PROMPTS):
        r = c.chat.completions.create(model="safety", messages=_user(prompt), max_tokens=N)
        assert r.choices[0].message.content == world["ref"]["safety"][i], prompt
        (g,) = r.model_extra["safety_patch"]["gates"]
        assert abs(g["logit"] - world["logits"][i]) < 1e-3 and g["fired"] == (world["logits"][i] > 0)
    asked = [x["model"] for x in _audit(standin)[n0:]]
    assert asked == ["safety" if lg > 0 else "base" for lg in world["logits"]]  # the adapter only when the gate fired
    chunks = list(c.chat.completions.create(model="safety", messages=_user(HARM[0]), max_tokens=N, stream=True))
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == world["ref"]["safety"][0]
    assert chunks[0].model_extra["safety_patch"]["decision"] == "patched"
    r = c.chat.completions.create(model="base", messages=_user(HARM[0]), max_tokens=N)
    assert r.choices[0].message.content == world["ref"]["base"][0]
    assert _audit(standin)[-1]["model"] == "base"
    lines = _audit(front)
    assert len(lines) == len(PROMPTS) + 2 and all(x["status"] == 200 for x in lines)


def test_upstream_failures_are_502_in_the_openai_shape(world, upstream, tmp_path):
    _, _, backend = upstream
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    s.close()  # nothing listens there now
    front = LiveServer(UpstreamBackend(backend.probe, dead, "base"), ServeConfig(audit_path=str(tmp_path / "a.jsonl")))
    front.audit = tmp_path / "a.jsonl"
    try:
        assert httpx.get(front.url + "/health").json()["status"] == "ok"
        for stream in (False, True):
            r = httpx.post(front.url + "/v1/chat/completions", json={"model": "safety", "messages": _user(HARM[0]),
                                                                     "stream": stream}, timeout=30)
            # streamed or not: the upstream's status is known before anything is sent, so a 502
            assert r.status_code == 502 and r.json()["error"]["code"] == "upstream_error", (stream, r.text)
            # the gate ran before the upstream failed (a user's trial: the 502 said nothing of it)
            line = _audit(front)[-1]
            assert line["status"] == 502 and line["decision"] == "patched" and line["gates"][0]["fired"]
            assert r.headers[ROUTE_HEADER].startswith("decision=patched")
        h = httpx.get(front.url + "/health").json()
        assert h["status"] == "degraded" and h["upstream_ok"] is False and "cannot reach upstream" in h["upstream_error"]
        with pytest.raises(openai.APIStatusError) as e:
            front.client().chat.completions.create(model="base", messages=_user("hi"))
        assert e.value.status_code == 502
        good = LiveServer(UpstreamBackend(backend.probe, upstream[0].url, "no-such-model"), ServeConfig())
        try:
            r = httpx.post(good.url + "/v1/chat/completions", json={"model": "base", "messages": _user("hi")}, timeout=30)
            assert r.status_code == 502 and "answered 404" in r.json()["error"]["message"]
        finally:
            good.stop()
    finally:
        front.stop()


def test_an_upstream_that_leads_back_to_the_server_is_a_loop_refused_at_once(world, tmp_path):
    """`serve --upstream` pointed at its own port: the request comes back carrying this server's id
    (serve.protocol.VIA_HEADER) and is refused 508 there, so the client gets one 502 naming the loop and
    the audit two lines, not a server calling itself until the timeout. A chain of distinct servers
    (the fixture above) still answers."""
    from safety_patch.serve.upstream import _api_base

    backend = build_upstream(world["model"], {"safety": [str(world["gated"])]}, "http://127.0.0.1:9/v1", "base",
                             device="cpu", timeout_s=30)
    front = LiveServer(backend, ServeConfig(max_tokens_limit=450, audit_path=str(tmp_path / "loop.jsonl")))
    front.audit = tmp_path / "loop.jsonl"
    try:
        backend.url = _api_base(front.url)
        backend.client = httpx.AsyncClient(base_url=backend.url, timeout=30)
        t0 = time.monotonic()
        with pytest.raises(openai.APIStatusError) as e:
            front.client().chat.completions.create(model="base", messages=_user(PROMPTS[0]), max_tokens=N)
        assert e.value.status_code == 502 and "loop detected" in str(e.value) and time.monotonic() - t0 < 20
        time.sleep(0.5)
        assert sorted(x["status"] for x in _audit(front)) == [502, 508]
    finally:
        front.stop()


def test_upstream_is_checked_at_start_up(world, upstream, tmp_path, capsys):
    """Found by a user's trial: `serve --upstream notaurl` started and /health said ok until the first request,
    and `--model default` forwarded every request as model "default", which vLLM does not serve. The URL is
    checked before the model loads; a reachable upstream must serve the base and a LoRA module per name;
    one not up yet is a warning, and /health says degraded until a request gets an answer started."""
    from safety_patch.serve.upstream import check_upstream

    standin = upstream[0]
    for bad in ("notaurl", "ftp://127.0.0.1:1/v1", "http://", "127.0.0.1:8001"):
        with pytest.raises(SafetyPatchError, match="not an http\\(s\\) URL|not a URL"):
            check_upstream(bad, "base", ["safety"])
    assert check_upstream(standin.url, "base", ["safety"]) is None  # serves base and safety
    with pytest.raises(SafetyPatchError, match="without the base 'default' \\(--upstream-model"):
        check_upstream(standin.url, "default", ["safety"])
    with pytest.raises(SafetyPatchError, match="a LoRA module 'other' .*--lora-modules other=PATCH_FOLDER"):
        check_upstream(standin.url, "base", ["safety", "other"])
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    dead = f"http://127.0.0.1:{s.getsockname()[1]}/v1"
    s.close()
    assert "not reachable at start-up" in check_upstream(dead, "base", ["safety"])
    warned = []
    backend = build_upstream(world["model"], {"safety": [str(world["gated"])]}, dead, "base", device="cpu",
                             on_warning=warned.append)
    assert len(warned) == 1 and "answered 502 until it answers" in warned[0]
    front = LiveServer(backend, ServeConfig(audit_path=str(tmp_path / "a.jsonl")))
    try:
        h = httpx.get(front.url + "/health").json()
        assert h["status"] == "degraded" and "not reachable at start-up" in h["upstream_error"]
    finally:
        front.stop()
    # the command: a bad URL is one line and exit 2, before the model loads
    assert main(["serve", "--model", world["model"], "--upstream", "notaurl", "--audit-log", str(tmp_path / "b.jsonl")]) == 2
    err = capsys.readouterr().err
    assert "--upstream 'notaurl' is not an http(s) URL" in err and "[serve] models" not in err


def test_an_upstream_that_does_not_stream_or_does_not_answer_is_named(world, upstream, tmp_path):
    """Found by a user's trial: a 200 of plain text or `{}` read "ended the answer without a finish_reason",
    and a client that gave up on a hung upstream was audited only when the upstream died, as 502."""
    import http.server

    _, _, backend = upstream
    hang = threading.Event()

    class Bad(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 (http.server's name)
            self.rfile.read(int(self.headers["content-length"]))
            if self.path.endswith("hang/v1/chat/completions"):
                hang.wait(30)
                return
            self.send_response(200)
            self.send_header("content-type", "text/html")
            self.end_headers()
            self.wfile.write(b"<html>not a stream</html>")

        def log_message(self, *a):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Bad)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{srv.server_address[1]}"
    front = LiveServer(UpstreamBackend(backend.probe, url, "base"), ServeConfig())
    slow = LiveServer(UpstreamBackend(backend.probe, url + "/hang", "base"),
                      ServeConfig(audit_path=str(tmp_path / "a.jsonl")))
    slow.audit = tmp_path / "a.jsonl"
    quick = LiveServer(UpstreamBackend(backend.probe, url + "/hang", "base", timeout_s=0.5), ServeConfig())
    try:
        r = httpx.post(front.url + "/v1/chat/completions", json={"model": "base", "messages": _user("hi")}, timeout=30)
        assert r.status_code == 502 and "sent no stream events (content-type 'text/html')" in r.json()["error"]["message"]
        assert httpx.get(front.url + "/health").json()["status"] == "degraded"
        # streamed, the same 502: the route (and with it the client's 200) waits for the first stream event
        r = httpx.post(front.url + "/v1/chat/completions", json={"model": "base", "messages": _user("hi"), "stream": True},
                       timeout=30)
        assert r.status_code == 502 and "sent no stream events" in r.json()["error"]["message"]
        # a hung upstream past --upstream-timeout is named as such, not as a bare "ReadTimeout: "
        r = httpx.post(quick.url + "/v1/chat/completions", json={"model": "base", "messages": _user("hi")}, timeout=30)
        assert r.status_code == 502
        assert "did not answer within --upstream-timeout 0.5 s (ReadTimeout)" in r.json()["error"]["message"]
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(slow.url + "/v1/chat/completions", json={"model": "safety", "messages": _user("hi")}, timeout=1)
        t0 = time.monotonic()
        while not (tmp_path / "a.jsonl").exists() or not (tmp_path / "a.jsonl").read_text().strip():
            assert time.monotonic() - t0 < 10, "the client's leaving was not audited while the upstream hung"
            time.sleep(0.05)
        (line,) = _audit(slow)
        assert (line["status"], line["finish_reason"]) == (499, "cancelled")
        assert line["decision"] in ("base", "safety") and line["gates"], "the gate ran: the 499 says where it sent it"
    finally:
        hang.set()
        front.stop()
        slow.stop()
        quick.stop()
        srv.shutdown()


def test_audit_log_keeps_text_only_with_log_prompts(tmp_path):
    from safety_patch.serve.audit import AuditLog

    for flag in (False, True):
        a = AuditLog(tmp_path / f"{flag}.jsonl", log_prompts=flag)
        a.write({"id": "x", "messages": [{"role": "user", "content": "secret prompt"}], "completion": "the answer"})
        a.write({"id": "y", "status": 400})
        a.close()
        lines = (tmp_path / f"{flag}.jsonl").read_text().splitlines()
        assert [json.loads(x)["id"] for x in lines] == ["x", "y"]
        assert ("secret prompt" in lines[0]) == flag and ("the answer" in lines[0]) == flag


# ----------------------------------------------------------------------------- the gate as a standard artifact


def test_exported_gate_runs_in_plain_transformers(world, tmp_path):
    """An exportable (final-norm, intercept-free) gate, written as a sequence-classification checkpoint:
    AutoModelForSequenceClassification and the text-classification pipeline give its logits to 1e-4."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline

    from safety_patch.serve.export import (
        CONFIG_KEY,
        export_gate,
        export_norm_gate,
        fit_norm_gate,
        norm_states,
    )

    lm = load_model(world["model"], device="cpu")
    tok = lm.tokenizer
    texts = [render(tok, _user(t)) for t in PROMPTS]
    gate = fit_norm_gate(lm.model, tok, texts[:4], texts[4:], layer=1)
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    want = gate.scores(norm_states(lm.model, tok, ids, 1))
    assert bool(gate.fires(norm_states(lm.model, tok, ids, 1))[:4].all()) and not bool(gate.fires(
        norm_states(lm.model, tok, ids, 1))[4:].any())  # it separates its training prompts
    out = export_norm_gate(lm, gate, tmp_path / "gate")
    clf = AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert clf.config.num_hidden_layers == 2 and clf.config.num_labels == 1
    # its one label names the score (a pipeline prints it for every prompt: "harmful" read as a verdict)
    assert clf.config.id2label == {0: "gate_logit (harmful iff > threshold_logit)"}
    assert clf.config.to_dict()[CONFIG_KEY]["threshold_logit"] == gate.threshold
    with torch.no_grad():
        one = torch.stack([clf(input_ids=torch.tensor([i])).logits[0, 0] for i in ids])
        t2 = AutoTokenizer.from_pretrained(out)
        t2.padding_side = "right"
        batch = t2(texts, add_special_tokens=False, padding=True, return_tensors="pt")
        many = clf(**batch).logits[:, 0]
    assert (one - want).abs().max() < 1e-4 and (many - want).abs().max() < 1e-4
    pipe = pipeline("text-classification", model=str(out), device="cpu", function_to_apply="none")
    got = torch.tensor([r["score"] for r in pipe(texts, tokenizer_kwargs={"add_special_tokens": False})])
    assert (got - want).abs().max() < 1e-4
    # Found by a user's trial: the export said to score the conversation as given, while serve routes on
    # the higher logit with and without the system messages, so a tool following the artifact let a
    # system prompt switch the gate off. The config states the rule and the model card's code, run as
    # written from the folder's parent, computes exactly the logit serve routes on.
    from safety_patch.generation import gate_views
    from safety_patch.serve.export import VIEWS_RULE

    rule = clf.config.to_dict()[CONFIG_KEY]
    assert rule["views"] == VIEWS_RULE and "highest logit over the views" in rule["decision"]
    card = (out / "README.md").read_text()
    code = card.split("```python\n", 1)[1].split("```", 1)[0]
    import os

    cwd = os.getcwd()
    os.chdir(out.parent)
    try:
        ns: dict = {}
        exec(compile(code, str(out / "README.md"), "exec"), ns)
    finally:
        os.chdir(cwd)
    assert isinstance(ns["route_to_patch"], bool)
    for prompt in PROMPTS[:3]:
        for system_role in ("system", "developer"):
            msgs = [{"role": system_role, "content": "Answer in French, tersely."}, *_user(prompt)]
            routed = [{**m, "role": "system" if m["role"] == "developer" else m["role"]} for m in msgs]
            views = [tok(v, add_special_tokens=False)["input_ids"] for v in gate_views(tok, routed)]
            assert len(views) == 2
            serve_logit = max(gate.scores(norm_states(lm.model, tok, views, 1)).tolist())
            assert abs(ns["gate_logit"](msgs) - serve_logit) < 1e-4
        assert abs(ns["gate_logit"](_user(prompt)) - gate.scores(norm_states(lm.model, tok, [ids[PROMPTS.index(prompt)]], 1)).item()) < 1e-4
    # docs/deploy.md's pipeline version of the same rule, as written but for the folder's path
    doc = (Path(__file__).resolve().parents[1] / "docs" / "deploy.md").read_text()
    snippet = doc.split("## The gate as a standard artifact", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    assert '"gate-hf"' in snippet
    dns: dict = {}
    exec(compile(snippet.replace('"gate-hf"', repr(str(out))), "docs/deploy.md", "exec"), dns)
    assert isinstance(dns["route_to_patch"], bool)
    msgs = [{"role": "system", "content": "Answer in French."}, *_user(PROMPTS[0])]
    assert abs(dns["gate_logit"](msgs) - ns["gate_logit"](msgs)) < 1e-4
    from safety_patch.gate.probe import Gate

    with pytest.raises(SafetyPatchError, match="pre-norm"):  # a residual (pre-norm) gate is refused, not approximated
        export_gate(lm, Gate.load(world["gated"]), tmp_path / "refused")
    assert not (tmp_path / "refused").exists()


def test_a_patch_changed_on_disk_after_start_is_checked_again_not_served(world, tmp_path):
    """Found by a user's trial: a running server re-attached its patches from disk without checking them,
    so a gate file whose threshold was raised to 100 served the base's answer to a harmful prompt while
    reporting the patch applied, and a zeroed adapter was reported as fired. Every re-attach now checks
    the files again when they changed since they were read: the same patch (a touched file) is served,
    another one is refused with the server's error."""
    import dataclasses
    import os
    import shutil

    live_patch = tmp_path / "live"
    shutil.copytree(world["gated"], live_patch)
    backend = build_embedded(world["model"], {"live": [str(live_patch)]}, device="cpu")
    eng = backend.engine
    ids = [eng.encode(eng.render(_user(HARM[0])))]
    first = eng.run("live", ids, [4])
    eng.run("base", ids, [4])  # switches away: the next "live" request attaches from disk again
    os.utime(live_patch / "gate.safetensors")  # touched, same bytes: still the patch that was checked
    assert [r.tokens for r in eng.run("live", ids, [4])] == [r.tokens for r in first]
    eng.run("base", ids, [4])
    g = Gate.load(live_patch)
    dataclasses.replace(g, threshold=100.0).save(live_patch)  # the gate would never fire
    with pytest.raises(SafetyPatchError, match="changed on disk since it was checked"):
        eng.run("live", ids, [4])
    eng.release()


def test_a_system_prompt_routes_on_the_higher_logit_of_both_views(world):
    """A request with a system message is routed as chat and eval route it: on the higher gate logit of
    the conversation with and without its system prompt (a system prompt can add routing, never remove
    it), and the body reports that logit."""
    from safety_patch.generation import gate_views

    lm = load_model(world["model"], device="cpu")
    gate = Gate.load(world["gated"])
    backend = build_embedded(world["model"], {"safety": world["stacks"]["safety"]}, device="cpu")
    srv = LiveServer(backend, ServeConfig(default_max_tokens=N))  # its own: the stop tests above close `live`'s
    c = srv.client()
    for prompt in PROMPTS[:4]:
        msgs = [{"role": "system", "content": "Answer in French, tersely."}, *_user(prompt)]
        views = [lm.tokenizer(v, add_special_tokens=False)["input_ids"] for v in gate_views(lm.tokenizer, msgs)]
        assert len(views) == 2
        want = max(gate.scores(layer_states(lm.model, lm.tokenizer, views, [1])[1]).tolist())
        r = c.chat.completions.create(model="safety", messages=msgs, max_tokens=2)
        (g,) = r.model_extra["safety_patch"]["gates"]
        assert abs(g["logit"] - want) < 1e-3 and g["fired"] == (want > gate.threshold)
    srv.stop()


def test_a_plain_answer_cut_at_shutdown_is_a_json_503(world, tmp_path):
    """Found by a user's trial: a non-streamed answer still running when the grace period ended got
    uvicorn's plain-text 500 while the audit log said 503. The app now cuts it first: 503, JSON."""
    import signal

    audit = tmp_path / "audit.jsonl"
    backend = build_embedded(world["model"], {}, device="cpu")  # its own: stopping the server closes it
    app = create_app(backend, ServeConfig(max_tokens_limit=450, audit_path=str(audit)))
    server, thread, url = _stoppable(app, 0.4)
    hook = backend.engine.base_model.model.layers[0].register_forward_pre_hook(lambda *_: time.sleep(0.005))
    try:
        with ThreadPoolExecutor(1) as ex:
            fut = ex.submit(httpx.post, url + "/v1/chat/completions", timeout=30,
                            json={"model": "base", "messages": _user(SAFE[1]), "max_tokens": 440})
            t0 = time.monotonic()
            while backend.batcher.running == 0:  # the answer is being generated
                assert time.monotonic() - t0 < 20
                time.sleep(0.01)
            server.handle_exit(signal.SIGTERM, None)
            r = fut.result(timeout=30)
        thread.join(20)
    finally:
        hook.remove()
    assert r.status_code == 503 and r.headers["content-type"].startswith("application/json")
    assert r.json()["error"]["message"] == "server shutting down"
    (line,) = [json.loads(x) for x in audit.read_text().splitlines()]
    assert (line["status"], line["error"], line["finish_reason"]) == (503, "server shutting down", "cancelled")


def test_upstream_answers_cut_at_shutdown_are_503_in_the_api_shape(world, tmp_path):
    """Upstream mode relays answers; at shutdown uvicorn cancelled the ones still running, a plain
    500 (non-streamed) or a stream ended without an event. The app cuts them first, as in embedded
    mode: a JSON 503 "server shutting down", a stream's error event, each audited as 503."""
    import signal

    slow = build_embedded(world["model"], {"safety": [str(world["ungated"])]}, device="cpu")  # as vLLM with the module
    hook = slow.engine.base_model.model.layers[0].register_forward_pre_hook(lambda *_: time.sleep(0.005))
    standin = LiveServer(slow, ServeConfig(max_tokens_limit=450))
    audit = tmp_path / "audit.jsonl"
    backend = build_upstream(world["model"], {"safety": [str(world["gated"])]}, standin.url, "base", device="cpu")
    server, thread, url = _stoppable(create_app(backend, ServeConfig(max_tokens_limit=450, audit_path=str(audit))), 0.4)
    body = {"model": "base", "messages": _user(SAFE[1]), "max_tokens": 440}
    try:
        with ThreadPoolExecutor(1) as ex, httpx.Client(timeout=30) as h, \
                h.stream("POST", url + "/v1/chat/completions", json=body | {"stream": True}) as s:
            lines = s.iter_lines()
            next(x for x in lines if x.startswith("data:") and '"content": "' in x)  # the stream is under way
            fut = ex.submit(httpx.post, url + "/v1/chat/completions", timeout=30, json=body)
            t0 = time.monotonic()
            while sum(httpx.get(standin.url + "/health").json()[k] for k in ("queued", "running")) < 2:
                assert time.monotonic() - t0 < 20  # the plain request is being relayed too
                time.sleep(0.01)
            server.handle_exit(signal.SIGTERM, None)
            rest = [json.loads(x[5:]) for x in lines if x.startswith("data:") and x[5:].strip() != "[DONE]"]
            r = fut.result(timeout=30)
        thread.join(20)
        assert not thread.is_alive()
    finally:
        hook.remove()
        standin.stop()
    assert rest and rest[-1]["error"]["message"] == "server shutting down"
    assert r.status_code == 503 and r.headers["content-type"].startswith("application/json")
    assert r.json()["error"]["message"] == "server shutting down"
    lines = [json.loads(x) for x in audit.read_text().splitlines()]
    assert [(x["status"], x["error"], x["finish_reason"]) for x in lines] == [(503, "server shutting down", "cancelled")] * 2
