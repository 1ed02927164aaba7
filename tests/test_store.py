import os
import signal
import subprocess
import sys

import pandas as pd
import pandera.pandas as pa
import pytest
from autoif.schemas.base import StepFrame
from pandera.typing import Series

from autoif.store import StepNotFoundError, StepRef, StepValidationError, Store


class Scores(StepFrame):
    item: Series[str]
    score: Series[float] = pa.Field(ge=0, le=1)


def frame(n=5):
    return pd.DataFrame({"item": [f"i{k}" for k in range(n)], "score": [k / n for k in range(n)],
                         "reason": [None if k % 2 else "odd_one_out" for k in range(n)]})


def roundtrip(store: Store):
    m = store.write_step(frame(), "r1", "scores", "abc123", schema=Scores, upstream=["x://up"], meta={"funnel": {"rows_in": 5}})
    assert m.rows == 5 and m.upstream == ["x://up"] and set(m.columns) == {"item", "score", "reason"}
    assert len(m.files) == 1 and len(m.digest) == 64
    again = store.manifest("r1", "scores", "abc123")
    assert again == m
    df, uri = store.read_step(m)
    assert uri == m.uri
    pd.testing.assert_frame_equal(df, frame())
    assert store.runs() == ["r1"]
    assert [x.step for x in store.manifests("r1")] == ["scores"]
    batches = list(store.iter_step(m, batch_rows=2))
    assert sum(len(b) for b in batches) == 5
    return m


def test_local_roundtrip(tmp_path):
    m = roundtrip(Store(str(tmp_path / "store")))
    assert m.uri == str(tmp_path / "store" / "r1" / "scores" / "abc123")
    assert (tmp_path / "store/r1/scores/abc123/part-00000.parquet").exists()


def test_s3_roundtrip(s3_server):
    store = Store("s3://autoif-test/pipeline", s3_endpoint_url=s3_server)
    m = roundtrip(store)
    assert m.uri == "s3://autoif-test/pipeline/r1/scores/abc123"
    import boto3

    keys = {o["Key"] for o in boto3.client("s3", endpoint_url=s3_server).list_objects_v2(Bucket="autoif-test")["Contents"]}
    assert "pipeline/r1/scores/abc123/_manifest.json" in keys


def test_validation_error_names_step_column_rows(tmp_path):
    bad = frame()
    bad.loc[3, "score"] = 7.0
    store = Store(str(tmp_path))
    with pytest.raises(StepValidationError) as e:
        store.write_step(bad, "r1", "scores", "k1", schema=Scores)
    msg = str(e.value)
    assert "'scores'" in msg and "'score'" in msg and "[3]" in msg and "7.0" in msg
    assert store.manifest("r1", "scores", "k1") is None


def test_reading_an_unfinished_step_is_an_error(tmp_path):
    store = Store(str(tmp_path))
    with pytest.raises(StepNotFoundError, match="never completed"):
        store.read_step(StepRef(run="r", step="s", key="k", uri="", rows=0, digest=""))


KILLED_WRITER = """
import sys, time
import pandas as pd
from autoif.store import Store
def parts():
    for i in range(100):
        yield pd.DataFrame({"item": [f"p{i}"], "reason": [None]})
        if i == 1:
            print("two parts written", flush=True)
            time.sleep(60)
Store(sys.argv[1]).write_step(parts(), "r1", "big", "k1")
"""


def test_killed_write_leaves_no_manifest_and_rerun_completes(tmp_path):
    root = str(tmp_path / "store")
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, root], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "two parts written"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    store = Store(root)
    assert (tmp_path / "store/r1/big/k1/part-00000.parquet").exists()  # partial data is there ...
    assert store.manifest("r1", "big", "k1") is None  # ... but the step is not done
    assert store.manifests("r1") == []
    m = store.write_step(pd.DataFrame({"item": ["a", "b"], "reason": [None, None]}), "r1", "big", "k1")
    assert m.rows == 2 and list(m.files) == ["part-00000.parquet"]  # stale parts removed
    assert len(store.read_step(m)[0]) == 2
