"""Code identity: a hash of the package sources that any edit changes, plus the git commit."""

import shutil

from safety_patch import provenance


def test_source_hash_changes_with_any_source_edit(tmp_path):
    root = tmp_path / "pkg"
    shutil.copytree(provenance.PACKAGE_ROOT, root, ignore=shutil.ignore_patterns("__pycache__"))
    before = provenance.source_sha256(root)
    assert before == provenance.source_sha256(root)  # deterministic
    f = root / "gate" / "probe.py"
    f.write_text(f.read_text() + "\n# an edit\n")
    edited = provenance.source_sha256(root)
    assert edited != before
    (root / "resources" / "new.json").write_text("{}")  # resources count too
    with_resource = provenance.source_sha256(root)
    assert with_resource not in (before, edited)
    # a byte-code cache does not
    cache = root / "__pycache__"
    cache.mkdir(exist_ok=True)
    (cache / "x.py").write_text("junk")
    assert provenance.source_sha256(root) == with_resource


def test_code_identity_outside_git_has_no_commit(tmp_path):
    root = tmp_path / "pkg"
    shutil.copytree(provenance.PACKAGE_ROOT, root, ignore=shutil.ignore_patterns("__pycache__"))
    ident = provenance.code_identity(root)
    assert ident["git_commit"] is None and ident["git_dirty"] is None
    assert ident["source_sha256"] == provenance.source_sha256(root)


def test_code_identity_in_this_checkout():
    ident = provenance.code_identity()
    assert len(ident["source_sha256"]) == 64
    if ident["git_commit"] is not None:  # the tests run from a checkout in CI
        assert len(ident["git_commit"]) == 40 and isinstance(ident["git_dirty"], bool)
    assert provenance.code_key() == ident["source_sha256"][:16]
    assert set(provenance.provenance()) == {"code", "versions"}


def test_library_versions_record_the_thread_count_numbers_were_computed_with():
    """The thread count sets each reduction's order (last digits of logits, a gate's AUROC bound);
    a trial found it missing from run.json, so two runs' differences could not be explained."""
    import torch

    before = torch.get_num_threads()
    try:
        for n in {1, before}:
            torch.set_num_threads(n)
            assert provenance.library_versions()["torch_threads"] == n
            assert provenance.provenance()["versions"]["torch_threads"] == n
    finally:
        torch.set_num_threads(before)
