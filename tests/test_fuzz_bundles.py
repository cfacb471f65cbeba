"""No traceback from any command for any bundle: random changes to a valid run's manifest, its
JSON files and its pickles (hashes recomputed, as an attacker would) must end in exit 0, 1 or
2, with one-line messages.

A few dozen examples run by default; ``APTBUNDLE_FUZZ_EXAMPLES=500`` runs the long round.
"""

import io
import json
import os
import pickle
import shutil
import zipfile

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aptbundle.format.run import Run
from conftest import cli, no_traceback

EXAMPLES = int(os.environ.get("APTBUNDLE_FUZZ_EXAMPLES", "12"))

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20) | st.sampled_from(["../x", "/etc/passwd", "\x1b]0;t\x07", "a\u202eb", "step-00000056"]),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4),
    max_leaves=12)
MANIFEST_KEYS = [("name",), ("trainer",), ("latest",), ("best",), ("history",), ("environment",),
                 ("checkpoints", 0, "step"), ("checkpoints", 0, "epoch"), ("checkpoints", 0, "metrics"),
                 ("checkpoints", 0, "path"), ("checkpoints", -1, "name"), ("files", 0, "size"), ("curves",)]
JSON_FILES = ["config.json", "tokenizer/vocab.json", "data/source.json", "logs/metrics.jsonl", "LATEST/trainer_state.json"]
PICKLES = ["LATEST/optimizer.pt", "LATEST/scheduler.pt", "LATEST/rng_state.pt"]


def _plant(run_dir, rel, data: bytes) -> None:
    (run_dir / rel).write_bytes(data)
    run = Run.open(run_dir)
    run.record_file(rel)
    run.save_manifest()


def _torch_zip(obj) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", pickle.dumps(obj, protocol=2))
    return buf.getvalue()


@settings(max_examples=EXAMPLES, deadline=None, derandomize=EXAMPLES <= 50,  # the default round repeats itself
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_mutated_bundles_never_give_a_traceback(tiny_run, tmp_path_factory, data):
    run_dir = tmp_path_factory.mktemp("fuzz") / "run1"
    shutil.copytree(tiny_run, run_dir)
    latest = f"checkpoints/{json.loads((run_dir / 'aptrun.json').read_text())['latest']}"
    kind = data.draw(st.sampled_from(["manifest", "json", "pickle", "bytes"]))
    if kind == "manifest":
        raw = json.loads((run_dir / "aptrun.json").read_text())
        *where, last = data.draw(st.sampled_from(MANIFEST_KEYS))
        node = raw
        for k in where:
            node = node[k]
        node[last] = data.draw(json_values)
        (run_dir / "aptrun.json").write_text(json.dumps(raw))
    elif kind == "json":
        rel = data.draw(st.sampled_from(JSON_FILES)).replace("LATEST", latest)
        text = (run_dir / rel).read_text()
        value = json.loads(text.splitlines()[0] if rel.endswith(".jsonl") else text)
        if isinstance(value, dict) and value and data.draw(st.booleans()):
            value[data.draw(st.sampled_from(sorted(value)))] = data.draw(json_values)
        else:
            value = data.draw(json_values)
        _plant(run_dir, rel, json.dumps(value).encode())
    elif kind == "pickle":
        rel = data.draw(st.sampled_from(PICKLES)).replace("LATEST", latest)
        _plant(run_dir, rel, _torch_zip(data.draw(json_values)))
    else:
        rel = data.draw(st.sampled_from(PICKLES + ["LATEST/model.safetensors"])).replace("LATEST", latest)
        blob = bytearray((run_dir / rel).read_bytes())
        for _ in range(data.draw(st.integers(1, 8))):
            blob[data.draw(st.integers(0, len(blob) - 1))] ^= data.draw(st.integers(1, 255))
        _plant(run_dir, rel, bytes(blob))
    for args in (["verify", run_dir], ["inspect", run_dir], ["ls", run_dir.parent],
                 ["resume", run_dir, "--stop-at-step", "57", "-q"]):
        r = cli(*args)  # an exception that is not a clean exit fails the test here, with its traceback
        assert r.exit_code in (0, 1, 2), (kind, args[0], r.exit_code, r.output)
        assert no_traceback(r.output), r.output
        assert all(line.startswith(("error:", "warning:", "removed", "cleaned", "resuming", "the run", "Usage",
                                    "Try", "Error", "stopped", "finished", "next:", "saved"))
                   or not line.strip() for line in r.stderr.splitlines()), r.stderr
