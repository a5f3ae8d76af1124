"""The data folder's one reader (data/folder.py): a built folder reads back exactly; a malformed
manifest, row or source file is one SafetyPatchError naming file, line and field."""

import json
import shutil

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from safety_patch.data.build import DataConfig, build, read_manifest, show
from safety_patch.data.folder import FILES, DataFolder
from safety_patch.errors import SafetyPatchError


def _lines(path):
    return [json.loads(x) for x in path.read_text(encoding="utf-8").split("\n") if x.strip()]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    d = tmp_path_factory.mktemp("folder") / "d"
    build(d, DataConfig(max_per_source=8, distill=False, self_instruct=0, borderline_train_extra=False,
                        template_max_chars=400, general_limit=30))
    return d


def _copy(built, tmp_path):
    d = tmp_path / "d"
    shutil.copytree(built, d)
    return d


# ----------------------------------------------------------------------------- a valid folder


def test_built_folder_reads_back_exactly(built):
    d = DataFolder(built)
    assert d.manifest == json.loads((built / "manifest.json").read_text())
    for name in ("train", "val", "test", "general", "borderline", "templates", "humaneval"):
        assert d.rows(name) == _lines(built / FILES[name]), name
    assert d.rows("train")  # the accessors below are checked on real rows, not vacuously
    # the filtered views say what the re-spelled filters they replaced said
    gen = _lines(built / "general.jsonl")
    assert d.in_split("general", "test") == [r for r in gen if r["meta"]["split"] == "test"]
    assert d.distilled("general", "test") == [r for r in gen if r["meta"]["split"] == "test"
                                              and r["messages"][-1]["role"] == "assistant"]
    assert d.prompts("general", "test") == [r["messages"][:-1] if r["messages"][-1]["role"] == "assistant"
                                            else r["messages"] for r in gen if r["meta"]["split"] == "test"]
    test = _lines(built / "test.jsonl")
    ids = list(dict.fromkeys(r["meta"]["behavior_id"] for r in test))
    assert [b["behavior_id"] for b in d.behaviours("test")] == ids
    tmpl = [t for t in _lines(built / "templates.jsonl") if t["split"] == "train"]
    assert [(t.id, t.text) for t in d.templates("train")] == [(t["id"], t["text"]) for t in tmpl] and tmpl
    assert d.verify() == []
    assert "harmful behaviours" in show(built)


def test_readers_of_every_stage_take_the_folder(built):
    """Training, gate fitting, evaluation and analysis read the same rows through the reader."""
    from safety_patch.analysis.run import default_prompts
    from safety_patch.evaluation.prompts import benign_prompts, harmful_requests
    from safety_patch.gate.config import GateFitConfig
    from safety_patch.gate.pool import gate_prompts
    from safety_patch.train.config import TrainConfig
    from safety_patch.train.data import training_rows

    d = DataFolder(built)
    rows, counts = training_rows(d, TrainConfig())
    assert counts == {"safety": len(_lines(built / "train.jsonl"))} and rows
    assert training_rows(built, TrainConfig()) == (rows, counts)  # a path reads the same
    harmful, benign, c = gate_prompts(built, GateFitConfig(rephrased=0, wrapped_benign=2, wrapped_harmful=0, self_instruct=0))
    assert c["harmful"] >= 1 and c["wrapped_benign"] == 2 and harmful and benign
    reqs, templates = harmful_requests(built, "test")
    assert len(reqs) == len({r["meta"]["behavior_id"] for r in _lines(built / "test.jsonl")}) and templates
    assert {b["set"] for b in benign_prompts(built, "test")} == {"borderline", "general"}
    benign_a, jail = default_prompts(built, n=4)
    assert benign_a and all(m[-1]["role"] == "user" for m in benign_a)


# ----------------------------------------------------------------------------- manifests


@pytest.mark.parametrize("edit, message", [
    (lambda m: [1, 2], r"manifest\.json: expected a JSON object, got list"),
    (lambda m: {k: v for k, v in m.items() if k != "counts"}, r"manifest\.json: missing field 'counts'"),
    (lambda m: m | {"kind": "other"}, r"manifest\.json: not a safety-patch data manifest"),
    (lambda m: m | {"seed": "0"}, r"manifest\.json: seed must be an integer, got string"),
    (lambda m: m | {"counts": m["counts"] | {"rows_per_split": {"train": "3"}}},
     r"manifest\.json: counts\.rows_per_split\.train must be an integer, got string"),
    (lambda m: m | {"sources": [{"license": "MIT"}]}, r"manifest\.json: missing field 'sources\[0\]\.name'"),
    (lambda m: m | {"counts": m["counts"] | {"self_instruct": {"kept": 1}}},
     r"manifest\.json: missing field 'counts\.self_instruct\.sampled'"),
])
def test_malformed_manifest_is_one_line_naming_the_field(built, tmp_path, edit, message):
    d = _copy(built, tmp_path)
    m = json.loads((d / "manifest.json").read_text())
    (d / "manifest.json").write_text(json.dumps(edit(m)))
    for read in (DataFolder, read_manifest, show):
        with pytest.raises(SafetyPatchError, match=message):
            read(d)


def test_manifest_json_traps(built, tmp_path):
    d = _copy(built, tmp_path)
    text = (d / "manifest.json").read_text()
    (d / "manifest.json").write_text(text[: len(text) // 2])
    with pytest.raises(SafetyPatchError, match=r"manifest\.json: invalid JSON"):
        DataFolder(d)
    # json keeps the last of two equal keys: the first value would silently not count
    (d / "manifest.json").write_text('{"seed": 1, ' + text.lstrip()[1:])
    with pytest.raises(SafetyPatchError, match=r"manifest\.json: invalid JSON \(duplicate key 'seed'\)"):
        DataFolder(d)
    with pytest.raises(SafetyPatchError, match="not a data folder"):
        DataFolder(tmp_path)


# ----------------------------------------------------------------------------- rows

MSGS = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "no"}]


@pytest.mark.parametrize("name, row, message", [
    ("train", {"messages": ["hi", "there"], "meta": {}}, r"train\.jsonl:1: messages\[0\] must be an object, got string"),
    ("train", {"messages": [{"role": "user", "content": 123}, {"role": "assistant", "content": ["x"]}], "meta": {}},
     r"train\.jsonl:1: messages\[0\]\.content must be a string, got integer"),
    ("train", {"messages": [], "meta": {}}, r"train\.jsonl:1: messages must not be empty"),
    ("train", {"messages": MSGS, "meta": {"request": 5}}, r"train\.jsonl:1: meta\.request must be a string, got integer"),
    ("train", {"msgs": MSGS}, r"train\.jsonl:1: missing field 'messages'"),
    ("borderline", {"messages": MSGS, "meta": "oops"}, r"borderline\.jsonl:1: meta must be an object, got string"),
    ("borderline", {"messages": MSGS, "meta": {"category": "x"}}, r"borderline\.jsonl:1: missing field 'meta\.split'"),
    ("general", {"messages": MSGS, "meta": {"category": "x", "split": "Test"}},
     r"general\.jsonl:1: meta\.split must be 'train', 'val' or 'test', got 'Test'"),
    ("test", {"messages": MSGS}, r"test\.jsonl:1: missing field 'meta'"),
    ("templates", {"id": "a", "family": "f", "source": "s", "split": "train", "text": None},
     r"templates\.jsonl:1: text must be a string, got null"),
])
def test_malformed_row_is_one_line_naming_file_line_and_field(built, tmp_path, name, row, message):
    d = _copy(built, tmp_path)
    (d / FILES[name]).write_text(json.dumps(row) + "\n")
    with pytest.raises(SafetyPatchError, match=message):
        DataFolder(d).rows(name)


@pytest.mark.parametrize("line, message", [
    ('{"messages": [{"role": "user", "content": "hi"}', "invalid JSON"),
    ('{"messages": [], "messages": [{"role": "user", "content": "hi"}]}', "invalid JSON \\(duplicate key 'messages'\\)"),
    ('{"messages": [{"role": "user", "content": "\\ud800"}], "meta": {}}', "invalid JSON \\(a string holds a lone surrogate"),
    ('{"messages": [{"role": "user", "content": "hi"}], "meta": {"x": NaN}}', "invalid JSON \\(NaN is not valid JSON\\)"),
    ('[1, 2]', "expected a JSON object, got list"),
])
def test_json_traps_in_rows(built, tmp_path, line, message):
    d = _copy(built, tmp_path)
    good = (d / "train.jsonl").read_text().split("\n")[0]
    (d / "train.jsonl").write_text(good + "\n" + line + "\n")
    with pytest.raises(SafetyPatchError, match=r"train\.jsonl:2: " + message):
        DataFolder(d).rows("train")


def test_empty_train_split_is_named_before_any_model(built, tmp_path):
    from safety_patch.train.config import TrainConfig
    from safety_patch.train.data import training_rows

    d = _copy(built, tmp_path)
    (d / "train.jsonl").write_text("")
    with pytest.raises(SafetyPatchError, match=r"train\.jsonl: no rows"):
        training_rows(d, TrainConfig())


def test_eval_reader_needs_full_harmful_meta_on_train_rows(built, tmp_path):
    """train.jsonl may leave meta out (training reads only messages); a round attacking the train
    split needs every behaviour field, and says which is missing where."""
    from safety_patch.evaluation.prompts import harmful_requests

    d = _copy(built, tmp_path)
    rows = _lines(d / "train.jsonl")
    del rows[1]["meta"]["behavior_id"]
    (d / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert len(DataFolder(d).rows("train")) == len(rows)
    with pytest.raises(SafetyPatchError, match=r"train\.jsonl:2: missing field 'meta\.behavior_id'"):
        harmful_requests(d, "train")


# ----------------------------------------------------------------------------- property: any malformed row

JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
                    | st.text(max_size=8), lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c,
                                                                                                max_size=3),
                    max_leaves=6)


def _paths(obj, prefix=()):
    """Every (path) into a JSON value: dict keys and list indices."""
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, prefix + (i,))


@st.composite
def mutated(draw, row):
    """A row with one fault: a value replaced or removed, or the whole line replaced or truncated.
    Returns the line's text."""
    kind = draw(st.sampled_from(["replace", "remove", "line", "truncate"]))
    row = json.loads(json.dumps(row))
    if kind in ("replace", "remove"):
        path = draw(st.sampled_from([p for p in _paths(row) if p]))
        parent = row
        for k in path[:-1]:
            parent = parent[k]
        if kind == "replace":
            parent[path[-1]] = draw(JSON)
        else:
            del parent[path[-1]]
        return json.dumps(row)
    if kind == "line":
        return json.dumps(draw(JSON))
    text = json.dumps(row)
    return text[: draw(st.integers(1, len(text) - 1))]


def _consumers(d):
    """Every reader of a data folder, on the folder ``d``."""
    from safety_patch.analysis.run import default_prompts
    from safety_patch.evaluation.capability import reference_pairs
    from safety_patch.evaluation.prompts import benign_prompts, harmful_requests
    from safety_patch.gate.pool import gate_prompts
    from safety_patch.train.config import TrainConfig, override
    from safety_patch.train.data import anchor_rows, training_rows

    cfg = override(TrainConfig(), {"data.general_ratio": 0.5, "data.contrast_ratio": 0.5, "gate.wrapped_benign": 2,
                                   "gate.wrapped_harmful": 2, "gate.self_instruct": 0, "anchor.kl": 1.0})
    return [lambda: training_rows(d, cfg), lambda: gate_prompts(d, cfg.gate_for_run()), lambda: anchor_rows(d, cfg),
            lambda: harmful_requests(d, "test"), lambda: harmful_requests(d, "train"), lambda: benign_prompts(d, "test"),
            lambda: reference_pairs(d, split="test"), lambda: default_prompts(d)]


@pytest.fixture(scope="module")
def small(built, tmp_path_factory):
    """A copy of the built folder cut to three rows per file, with distilled benign rows (made up)."""
    d = tmp_path_factory.mktemp("small") / "d"
    shutil.copytree(built, d)
    for name in ("train", "test", "general", "borderline", "templates"):
        rows = _lines(d / FILES[name])
        if name in ("general", "borderline"):
            rows = [r | {"messages": r["messages"][:1] + [{"role": "assistant", "content": "An answer."}],
                         "meta": r["meta"] | {"split": s}} for r, s in zip(rows[:3], ("train", "test", "train"), strict=True)]
        elif name == "templates":
            rows = [t for t in rows if t["split"] == "train"][:2] + [t for t in rows if t["split"] == "test"][:1]
        (d / FILES[name]).write_text("".join(json.dumps(r) + "\n" for r in rows[:3]))
    return d


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), name=st.sampled_from(["train", "test", "general", "borderline", "templates"]),
       at=st.integers(0, 2))
def test_any_malformed_row_is_named_or_read_as_written(small, tmp_path_factory, data, name, at):
    d = tmp_path_factory.mktemp("prop") / "d"
    shutil.copytree(small, d)
    lines = (d / FILES[name]).read_text().split("\n")[:3]
    lines[at] = data.draw(mutated(json.loads(lines[at])))
    (d / FILES[name]).write_text("\n".join(lines) + "\n")
    try:
        rows = DataFolder(d).rows(name)
    except SafetyPatchError as e:
        msg = str(e)
        assert f"{FILES[name]}:{at + 1}: " in msg and "\n" not in msg, msg
        return
    # accepted: exactly the values in the file (nothing coerced, merged or dropped) ...
    assert rows == [json.loads(x) for x in lines]
    # ... and every stage that reads the folder either works or says what is wrong in one line
    for read in _consumers(d):
        try:
            read()
        except SafetyPatchError as e:
            assert "\n" not in str(e)


# ----------------------------------------------------------------------------- source files


def test_csv_with_an_unterminated_quote_is_named_not_merged(tmp_path):
    from safety_patch.data.sources.files import load_user_file, read_prompt_rows

    f = tmp_path / "u.csv"
    for text, error in [
        ('prompt\nHow to pick a lock\n"How to forge a passport\nHow to hack a wifi network\nHow to steal a car\n',
         r"u\.csv:3: unterminated quoted field"),
        ('prompt\n"ab"c\n', r"u\.csv:2: text after a closing quote: a quote left open"),
        # a quote left open that a later line's quote closes: named at the line it opened on, in words
        ('prompt\nok\n"How to forge a passport\nHow to say "hi" politely\n', r"u\.csv:3: text after a closing quote"),
        ("", r"u\.csv: empty file"),
    ]:
        f.write_text(text)
        with pytest.raises(SafetyPatchError, match=error):
            read_prompt_rows(f)
    j = tmp_path / "u.jsonl"
    j.write_text('{"prompt": "fine"}\n{"prompt": "cut off\n')
    with pytest.raises(SafetyPatchError, match=r"u\.jsonl:2: invalid JSON \(Unterminated string starting at: column 12\)$"):
        read_prompt_rows(j)
    # a comma outside quotes would silently cut the prompt at the comma
    f.write_text("prompt\nHow to do this, then that\n")
    with pytest.raises(SafetyPatchError, match=r"u\.csv:2: 2 fields, but the header has 1"):
        read_prompt_rows(f)
    # a closed quote may hold a newline (CSV's own way to write one); lines stay those where records start
    f.write_text('prompt,category\n"two\nlines",x\n\nlast,y\n')
    assert read_prompt_rows(f) == [(f"{f}:2", {"prompt": "two\nlines", "category": "x"}),
                                   (f"{f}:5", {"prompt": "last", "category": "y"})]
    assert [r.text for r in load_user_file(str(f))[0]] == ["two\nlines", "last"]


def test_jsonl_source_fields_keep_their_types(tmp_path):
    from safety_patch.data.sources.files import load_user_file

    f = tmp_path / "s.jsonl"
    for row, field in (({"prompt": "x", "category": 5}, "category"), ({"prompt": ["x"]}, "prompt"),
                       ({"prompt": "x", "response": {"a": 1}}, "response"), ({"prompt": "x", "behavior_id": [1]}, "behavior_id")):
        f.write_text(json.dumps({"prompt": "ok"}) + "\n" + json.dumps(row) + "\n")
        with pytest.raises(SafetyPatchError, match=rf"s\.jsonl:2: '{field}' must be a string"):
            load_user_file(str(f))
    f.write_text(json.dumps({"prompt": "x", "behavior_id": 7}) + "\n")
    assert load_user_file(str(f))[0][0].behavior_id == "7"
