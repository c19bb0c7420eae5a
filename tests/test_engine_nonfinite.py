"""The non-finite guard through the real launcher: a test-registered plug-in loss whose every update
is NaN; DeepSpeed's step must not poison the weights, each update is counted in
`nonfinite_updates`, and `run.max_bad_steps` such steps in a row stop the run with exit code 3 and
the message that says what to look at. The random tiny Llama of tests/conftest.py: the guard does
not depend on the model."""
from __future__ import annotations


from tests.engine_helpers import TINY, on_tiny_model, read_metrics, run_training


def test_nonfinite_updates_are_counted_and_stop_the_run(tmp_path, tiny_model_dir):
    out = tmp_path / "run"
    r = run_training(tmp_path, 1, TINY + on_tiny_model(tiny_model_dir) + [f"run.output_dir={out}", "run.total_steps=4", "run.max_bad_steps=2",
                                          "loss.name=tests.losses_for_tests:nonfinite", "run.token_dump_every=0",
                                          "run.tensorboard=false", "data.system_prompt=none"])
    assert r.returncode == 3, (r.returncode, r.stderr[-4000:])
    assert "rlengine: training stopped: 2 steps in a row had a non-finite loss or gradient (step 2)" in r.stdout + r.stderr
    assert "train.lr" in r.stdout + r.stderr
    rows = read_metrics(out)
    assert [x["step"] for x in rows] == [1]            # step 2 stopped the run before its line
    assert rows[0]["nonfinite_updates"] == 2            # 2 iterations x 1 mini-batch, both NaN
    assert rows[0]["loss"] is None                     # NaN is written as null
    assert rows[0]["sync/checksum_ok"] == 1.0           # the skipped updates left the weights finite
