"""``safety-patch serve``: an OpenAI-compatible server for a base model and its safety-patch stacks.

Modules: ``engine`` (the only one that touches models, patches and gates), ``batcher``
(micro-batching on one worker thread), ``protocol`` (the request schema, errors, headers and
limits), ``app`` (FastAPI routes), ``embedded`` (the model in this process behind the batcher),
``upstream`` (gate here, answer from a vLLM server), ``server`` (the socket and uvicorn with a
graceful stop), ``audit`` (the JSONL audit log), ``export`` (a gate as a transformers
sequence-classification checkpoint). See docs/deploy.md.
"""
