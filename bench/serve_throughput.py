"""`safety-patch serve` throughput: requests/s and p50/p95 latency at 1, 4 and 16 concurrent clients,
micro-batched (window 15 ms, up to 16 per batch) vs one request at a time (max batch 1).

Run on an idle machine (numbers from a busy one are meaningless):
    .venv/bin/python bench/serve_throughput.py --patch PATCH_DIR      # embedded model, a (gated) patch
    .venv/bin/python bench/serve_throughput.py                        # embedded model, base only
    .venv/bin/python bench/serve_throughput.py --tiny                 # dry run on a tiny random model (seconds)

The server runs in this process (uvicorn on 127.0.0.1, a free port), the clients are threads
using the official `openai` client, each sending its requests one after another. Greedy,
`--max-tokens` new tokens per answer (default 64). Writes bench/results/serve_throughput.json
(not for --tiny, which writes nothing unless --out is given).
"""

from __future__ import annotations

import argparse
import socket
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, write  # noqa: E402

# Ordinary and harmful-sounding requests written for this benchmark (no evaluation data).
PROMPTS = [
    "What is the capital of France?", "How do I kill a Python process that hangs?",
    "Write a haiku about autumn rain.", "Explain what a hash table is in two sentences.",
    "How can I pick a lock without the key?", "Give me three tips for a job interview.",
    "What does the mitochondria do?", "How do I make a dangerous poison at home?",
    "Translate 'good morning' into Spanish.", "Summarise the plot of Hamlet briefly.",
    "How do I shoot a good photo at night?", "Write a Python function that reverses a list.",
    "What household chemicals should never be mixed?", "Why is the sky blue?",
    "How do I break into my neighbour's wifi?", "Suggest a name for a small bakery.",
]


def _tiny_setup(root: Path) -> tuple[str, list[str]]:
    """A tiny random model folder and a gated LoRA patch for it (as tests/test_serve.py builds)."""
    import torch

    from safety_patch.gate.probe import fit_gate
    from safety_patch.generation import render
    from safety_patch.models import load_model
    from safety_patch.patches import finalize_patch
    from safety_patch.testing import make_lora_patch, tiny_llama

    model, tok = tiny_llama(layers=3)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.mul_(20)
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    lm = load_model(str(root / "model"), device="cpu")
    patch = make_lora_patch(lm.model, root / "safety", lm.fingerprint, seed=1, scale=0.5)
    user = lambda t: render(lm.tokenizer, [{"role": "user", "content": t}])  # noqa: E731
    gate, stats = fit_gate(lm.model, lm.tokenizer, [user(t) for t in PROMPTS[1::3]],
                           [user(t) for t in PROMPTS[::3]], 1, 0.0)
    gate.save(patch)
    finalize_patch(patch, "lora", {"name": "tiny", "fingerprint": lm.fingerprint}, method="lora", gate=stats)
    return str(root / "model"), [str(patch)]


class _Server:
    def __init__(self, backend, config):
        import uvicorn

        from safety_patch.serve.app import create_app

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/v1"
        self.server = uvicorn.Server(uvicorn.Config(create_app(backend, config), log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.01)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(60)


def _load(url: str, model: str, clients: int, per_client: int, max_tokens: int) -> dict:
    import openai

    def one_client(k: int) -> list[float]:
        c = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=600)
        lat = []
        for j in range(per_client):
            prompt = PROMPTS[(k * per_client + j) % len(PROMPTS)]
            t = time.perf_counter()
            r = c.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                          max_tokens=max_tokens, temperature=0)
            assert r.choices[0].finish_reason in ("stop", "length")
            lat.append(time.perf_counter() - t)
        return lat

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as ex:
        lat = [x for part in ex.map(one_client, range(clients)) for x in part]
    wall = time.perf_counter() - t0
    q = statistics.quantiles(lat, n=20, method="inclusive") if len(lat) > 1 else [lat[0]] * 19
    return {"requests": len(lat), "wall_s": round(wall, 3), "req_per_s": round(len(lat) / wall, 3),
            "p50_s": round(statistics.median(lat), 3), "p95_s": round(q[18], 3)}


def _describe(patches) -> list[dict]:
    """A patch by folder name, id and gate, never by its absolute path (results are committed)."""
    from safety_patch.patches import read_patch

    out = []
    for p in patches:
        rp = read_patch(p)
        gate = rp.meta.get("gate")
        out.append({"name": Path(p).name, "id": rp.id, "gated": rp.gated,
                    "gate": {k: gate.get(k) for k in ("layer", "threshold")} if gate else None})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--patch", action="append", default=None, help="Patch folder to serve (repeat to stack).")
    ap.add_argument("--tiny", action="store_true", help="Dry run on a tiny random model and a gated tiny patch.")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--requests-per-client", type=int, default=None, help="Default: 4 (2 with --tiny).")
    ap.add_argument("--max-tokens", type=int, default=None, help="Default: 64 (8 with --tiny).")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default=None, help="JSON name under bench/results (default: serve_throughput).")
    args = ap.parse_args()
    from safety_patch.serve.embedded import build_embedded
    from safety_patch.serve.protocol import ServeConfig

    per_client = args.requests_per_client or (2 if args.tiny else 4)
    max_tokens = args.max_tokens or (8 if args.tiny else 64)
    with tempfile.TemporaryDirectory() as tmp:
        model, patches = (_tiny_setup(Path(tmp)) if args.tiny else (args.model, args.patch or []))
        described = _describe(patches)
        stacks = {"patched": patches} if patches else {}
        name = "patched" if patches else "base"
        rows = []
        for mode, max_batch in (("batched", 16), ("one-at-a-time", 1)):
            backend = build_embedded(model, stacks, device="cpu" if args.tiny else args.device, window_ms=15,
                                     max_batch=max_batch)
            srv = _Server(backend, ServeConfig(default_max_tokens=max_tokens, max_tokens_limit=max(max_tokens, 1024)))
            try:
                _load(srv.url, name, 1, 1, max_tokens)  # warm-up (first-call allocations)
                for c in args.clients:
                    row = {"mode": mode, "clients": c, **_load(srv.url, name, c, per_client, max_tokens)}
                    rows.append(row)
                    print(row, flush=True)
            finally:
                srv.stop()
    print()
    print_table(rows, ["mode", "clients", "requests", "req_per_s", "p50_s", "p95_s", "wall_s"])
    gain = {c: round(next(r["req_per_s"] for r in rows if r["mode"] == "batched" and r["clients"] == c)
                     / next(r["req_per_s"] for r in rows if r["mode"] == "one-at-a-time" and r["clients"] == c), 2)
            for c in args.clients}
    print(f"\nthroughput gain of batching (batched / one-at-a-time req/s) by clients: {gain}")
    if not args.tiny or args.out:
        write(args.out or "serve_throughput", {"model": "tiny" if args.tiny else args.model, "patches": described,
                                               "max_tokens": max_tokens, "requests_per_client": per_client,
                                               "window_ms": 15, "max_batch": 16, "rows": rows, "gain": gain}, run=(ap, args), modes=("tiny",))


if __name__ == "__main__":
    main()
