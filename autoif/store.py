"""Versioned Parquet on fsspec (local path or ``s3://`` through s3fs).

Layout: ``<root>/<run>/<step>/<key>/part-00000.parquet ... _manifest.json``. ``key`` hashes the step's
config, its code and its input versions. The manifest is written last: a step counts as done only when its
manifest exists, so a write killed half-way never looks complete and a re-run simply writes it again.
Every write validates the frame with the step's Pandera schema first.
"""
from __future__ import annotations

import datetime as dt
import functools
import hashlib
import io
import json
import posixpath
from typing import Callable, Iterable, Sequence

import fsspec
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel

from autoif import __version__
from autoif.config import StoreConfig

MANIFEST = "_manifest.json"


class StepValidationError(ValueError):
    """A step's output broke its contract; the message names step, column and example rows."""


class StepNotFoundError(FileNotFoundError):
    pass


class StepRef(BaseModel):
    """A finished step output: small, JSON-serialisable, what Prefect tasks pass between each other."""

    run: str
    step: str
    key: str
    uri: str
    rows: int
    digest: str  # sha256 over the data files' sha256s: the dataset version


class Manifest(StepRef):
    columns: dict[str, str]
    files: dict[str, str]  # file name -> sha256
    upstream: list[str]
    code_version: str
    created_at: str
    meta: dict = {}  # e.g. the step's funnel and metrics


class Store:
    def __init__(self, root: str, s3_endpoint_url: str | None = None) -> None:
        self.root = root.rstrip("/")
        options = {"client_kwargs": {"endpoint_url": s3_endpoint_url}} if s3_endpoint_url and root.startswith("s3://") else {}
        self.fs, self._base = fsspec.core.url_to_fs(self.root, **options)
        self._protocol = root.split("://", 1)[0] + "://" if "://" in root else ""

    @classmethod
    def from_config(cls, cfg: StoreConfig) -> "Store":
        return cls(cfg.root, cfg.s3_endpoint_url)

    # --- paths ----------------------------------------------------------------------------------------
    def _dir(self, run: str, step: str, key: str) -> str:
        for part, name in ((run, "run"), (step, "step"), (key, "key")):
            if not part or "/" in part or part.startswith("."):
                raise ValueError(f"invalid {name} name {part!r}")
        return posixpath.join(self._base, run, step, key)

    def uri(self, run: str, step: str, key: str) -> str:
        return self._protocol + self._dir(run, step, key) if self._protocol else self._dir(run, step, key)

    # --- write ----------------------------------------------------------------------------------------
    def write_step(
        self,
        data: pd.DataFrame | Iterable[pd.DataFrame],
        run: str,
        step: str,
        key: str,
        schema=None,
        upstream: Sequence[str] = (),
        meta: dict | Callable[[], dict] | None = None,
    ) -> Manifest:
        """Validate and write one step output (a frame, or an iterable of frames written as parts, one at a
        time). ``meta`` may be a callable, evaluated after the last part (e.g. counts gathered while streaming)."""
        d = self._dir(run, step, key)
        if self.fs.exists(d):  # leftovers of a killed write: start clean
            self.fs.rm(d, recursive=True)
        self.fs.makedirs(d, exist_ok=True)
        frames = [data] if isinstance(data, pd.DataFrame) else data
        files: dict[str, str] = {}
        rows = 0
        columns: dict[str, str] = {}
        arrow_schema: pa.Schema | None = None
        for i, frame in enumerate(frames):
            if schema is not None:
                frame = validate(frame, schema, step, part=i)
            table = pa.Table.from_pandas(frame, preserve_index=False)
            if arrow_schema is None:
                # an all-null column of the first part must not fix the type to null for later parts
                arrow_schema = pa.schema([f.with_type(pa.string()) if pa.types.is_null(f.type) else f for f in table.schema],
                                         metadata=table.schema.metadata)
                table = table.cast(arrow_schema)
                columns = {f.name: str(f.type) for f in table.schema}
            elif table.schema != arrow_schema:
                table = table.cast(arrow_schema)
            buf = io.BytesIO()
            pq.write_table(table, buf)
            name = f"part-{i:05d}.parquet"
            payload = buf.getvalue()
            with self.fs.open(posixpath.join(d, name), "wb") as f:
                f.write(payload)
            files[name] = hashlib.sha256(payload).hexdigest()
            rows += table.num_rows
        if not files:  # an empty iterable still yields a valid, empty step output
            raise StepValidationError(f"step {step!r}: no data frames to write")
        digest = hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()
        manifest = Manifest(
            run=run, step=step, key=key, uri=self.uri(run, step, key), rows=rows, digest=digest,
            columns=columns, files=files, upstream=list(upstream), code_version=code_version(),
            created_at=dt.datetime.now(dt.timezone.utc).isoformat(), meta=(meta() if callable(meta) else meta) or {},
        )
        with self.fs.open(posixpath.join(d, MANIFEST), "w") as f:  # last: marks the step done
            f.write(manifest.model_dump_json(indent=2))
        return manifest

    # --- read -----------------------------------------------------------------------------------------
    def manifest(self, run: str, step: str, key: str) -> Manifest | None:
        path = posixpath.join(self._dir(run, step, key), MANIFEST)
        if not self.fs.exists(path):
            return None
        with self.fs.open(path, "r") as f:
            return Manifest.model_validate_json(f.read())

    def read_step(self, ref: StepRef) -> tuple[pd.DataFrame, str]:
        """The frame of a finished step and its URI; raises if the step never completed."""
        d = self._dir(ref.run, ref.step, ref.key)
        m = self.manifest(ref.run, ref.step, ref.key)
        if m is None:
            raise StepNotFoundError(f"{self.uri(ref.run, ref.step, ref.key)}: no {MANIFEST}; the step never completed")
        tables = []
        for name in sorted(m.files):
            with self.fs.open(posixpath.join(d, name), "rb") as f:
                tables.append(pq.read_table(f))
        return pa.concat_tables(tables).to_pandas(), m.uri

    def iter_step(self, ref: StepRef, batch_rows: int = 10_000) -> Iterable[pd.DataFrame]:
        """Stream a finished step in batches (bounded memory for large steps)."""
        m = self.manifest(ref.run, ref.step, ref.key)
        if m is None:
            raise StepNotFoundError(f"{ref.uri}: no {MANIFEST}; the step never completed")
        d = self._dir(ref.run, ref.step, ref.key)
        for name in sorted(m.files):
            with self.fs.open(posixpath.join(d, name), "rb") as f:
                for batch in pq.ParquetFile(f).iter_batches(batch_size=batch_rows):
                    yield batch.to_pandas()

    def runs(self) -> list[str]:
        if not self.fs.exists(self._base):
            return []
        return sorted(posixpath.basename(p.rstrip("/")) for p in self.fs.ls(self._base, detail=False) if self.fs.isdir(p))

    def manifests(self, run: str) -> list[Manifest]:
        """Completed step outputs of a run, oldest first."""
        found = [m for m in (self._load(p) for p in self.fs.glob(posixpath.join(self._base, run, "*", "*", MANIFEST))) if m]
        return sorted(found, key=lambda m: m.created_at)

    def _load(self, path: str) -> Manifest | None:
        with self.fs.open(path, "r") as f:
            return Manifest.model_validate_json(f.read())


def validate(frame: pd.DataFrame, schema, step: str, part: int = 0) -> pd.DataFrame:
    """Validate with a Pandera DataFrameModel; failures name the step, the columns and example rows."""
    import pandera.errors as pae

    try:
        return schema.validate(frame, lazy=True)
    except pae.SchemaErrors as e:
        fc = e.failure_cases
        lines = [f"step {step!r} (part {part}): output breaks schema {getattr(schema, '__name__', schema)!s}:"]
        for (column, check), group in fc.groupby(["column", "check"], dropna=False, sort=False):
            rows = [int(i) for i in group["index"].dropna().tolist()[:5]] if "index" in group else []
            examples = [repr(v)[:80] for v in group["failure_case"].tolist()[:3]]
            lines.append(f"  column {column!r}: check {check} failed at rows {rows} (examples: {', '.join(examples)})")
        raise StepValidationError("\n".join(lines)) from None


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """Package version plus the git commit when run from a checkout."""
    import subprocess
    from pathlib import Path

    here = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "-C", str(here), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5)
        if sha.returncode == 0:
            return f"{__version__}+g{sha.stdout.strip()}"
    except (OSError, subprocess.SubprocessError):
        return __version__
    return __version__
