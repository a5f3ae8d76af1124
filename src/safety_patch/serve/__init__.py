"""``safety-patch serve``: an OpenAI-compatible server for a base model and its safety-patch stacks.

Modules: ``engine`` (the only one that touches models, patches and gates), ``batcher``
(micro-batching on one worker thread), ``app`` (FastAPI routes and schemas), ``upstream``
(gate here, answer from a vLLM server), ``audit`` (the JSONL audit log), ``export`` (a gate as a
transformers sequence-classification checkpoint). See docs/deploy.md.
"""
