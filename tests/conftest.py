import os

import pytest

# Tests never touch the user's cache or the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path_factory, monkeypatch, request):
    # The slow tests share one real cache (the embedded model's conversion takes ~30 s);
    # every other test gets its own empty SAFETY_PATCH_HOME.
    if request.node.get_closest_marker("slow"):
        return
    monkeypatch.setenv("SAFETY_PATCH_HOME", str(tmp_path_factory.mktemp("home")))


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    from safety_patch.testing import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture()
def tiny():
    from safety_patch.testing import tiny_llama

    return tiny_llama()
