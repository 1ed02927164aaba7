"""Versioned Parquet on fsspec (local path or ``s3://`` through s3fs).

Layout: ``<root>/<run>/<step>/<key>/part-00000.parquet ... _manifest.json``. ``key`` hashes the step's
config, its code and its input versions. The manifest is written last: a step counts as done only when its
manifest exists, so a write killed half-way never looks complete and a re-run simply writes it again.
Every write validates the frame with the step's Pandera schema first.

A step may also leave files beside its parts (an export's JSON, a dataset card): ``write_step(files={name:
bytes})``, or a frame that carries them in ``frame.attrs[FILES_ATTR]`` (how a plain task function hands them
over). They are written after the parts and before the manifest, listed with their sha256 in
``Manifest.files_extra`` and covered by the digest.
"""
from __future__ import annotations

import datetime as dt
import functools
import hashlib
import io
import json
import posixpath
import uuid
from typing import Callable, Iterable, Mapping, Sequence

import fsspec
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel

from autoif import __version__
from autoif.config import StoreConfig

MANIFEST = "_manifest.json"
FILES_ATTR = "autoif.files"  # frame.attrs key: {file name: bytes} to write beside the step's parts


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
    files_extra: dict[str, str] = {}  # files beside the parts (not Parquet parts of the step): name -> sha256


class Part(BaseModel):
    """One written Parquet part of a step output."""

    name: str
    sha256: str
    rows: int
    columns: dict[str, str]


def part_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


def concat_parts(tables: list[pa.Table]) -> pa.Table:
    """Parts written independently may disagree on a column's type where one part had only nulls: the
    later parts are cast to the first part's schema."""
    first = tables[0].schema
    return pa.concat_tables([t if t.schema == first else t.cast(first) for t in tables])


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

    # --- write ---------------------------------------------------------------------------------------
    def write_step(
        self,
        data: pd.DataFrame | Iterable[pd.DataFrame],
        run: str,
        step: str,
        key: str,
        schema=None,
        upstream: Sequence[str] = (),
        meta: dict | Callable[[], dict] | None = None,
        files: Mapping[str, bytes] | None = None,
    ) -> Manifest:
        """Validate and write one step output (a frame, or an iterable of frames written as parts, one at a
        time), then the extra ``files`` (default: a frame's ``attrs[FILES_ATTR]``), then its manifest. ``meta``
        may be a callable, evaluated after the last part."""
        d = self._dir(run, step, key)
        if self.fs.exists(d):  # leftovers of a killed write: start clean
            self.fs.rm(d, recursive=True)
        if isinstance(data, pd.DataFrame) and FILES_ATTR in data.attrs:
            files = data.attrs[FILES_ATTR] if files is None else files
            data = data.copy(deep=False)  # pyarrow would put attrs into the Parquet metadata: not the files
            data.attrs = {k: v for k, v in data.attrs.items() if k != FILES_ATTR}
        frames = [data] if isinstance(data, pd.DataFrame) else data
        parts = [self.write_part(frame, run, step, key, i, schema=schema) for i, frame in enumerate(frames)]
        if not parts:
            raise StepValidationError(f"step {step!r}: no data frames to write")
        extra = {name: self.write_file(run, step, key, name, payload) for name, payload in sorted((files or {}).items())}
        return self.commit(parts, run, step, key, upstream=upstream, meta=(meta() if callable(meta) else meta) or {},
                           files_extra=extra)

    def write_part(self, frame: pd.DataFrame, run: str, step: str, key: str, index: int, schema=None) -> Part:
        """Validate and write part ``index`` of a step output. The part appears whole or not at all (a local
        file is renamed into place; an S3 object exists only once its upload completed)."""
        if schema is not None:
            frame = validate(frame, schema, step, part=index)
        table = pa.Table.from_pandas(frame, preserve_index=False)
        # an all-null column must not fix the type to null (later parts hold values)
        table = table.cast(pa.schema([f.with_type(pa.string()) if pa.types.is_null(f.type) else f for f in table.schema],
                                     metadata=table.schema.metadata))
        buf = io.BytesIO()
        pq.write_table(table, buf)
        payload = buf.getvalue()
        d = self._dir(run, step, key)
        name = part_name(index)
        self._put(d, name, payload)
        return Part(name=name, sha256=hashlib.sha256(payload).hexdigest(), rows=table.num_rows,
                    columns={f.name: str(f.type) for f in table.schema})

    def read_part(self, run: str, step: str, key: str, index: int) -> tuple[pd.DataFrame, Part] | None:
        """A part written earlier (a batch finished before a crash), or None."""
        d = self._dir(run, step, key)
        path = posixpath.join(d, part_name(index))
        self.fs.invalidate_cache(d)
        if not self.fs.exists(path):
            return None
        with self.fs.open(path, "rb") as f:
            payload = f.read()
        table = pq.read_table(io.BytesIO(payload))
        part = Part(name=part_name(index), sha256=hashlib.sha256(payload).hexdigest(), rows=table.num_rows,
                    columns={f.name: str(f.type) for f in table.schema})
        return table.to_pandas(), part

    def write_file(self, run: str, step: str, key: str, name: str, data: bytes) -> str:
        """Write one extra file beside a step's parts (whole or not at all, like a part); returns its sha256.
        The step counts as done only once :meth:`commit` lists it in the manifest."""
        if (not name or "/" in name or "\\" in name or name.startswith(".") or name == MANIFEST
                or (name.startswith("part-") and name.endswith(".parquet"))):
            raise ValueError(f"step {step!r}: invalid extra file name {name!r}")
        if not isinstance(data, (bytes, bytearray)):
            raise TypeError(f"step {step!r}: extra file {name!r} must be bytes, got {type(data).__name__}")
        self._put(self._dir(run, step, key), name, data)
        return hashlib.sha256(data).hexdigest()

    def _put(self, d: str, name: str, payload: bytes) -> None:
        """Write ``d/name`` whole or not at all: a local file is renamed into place; an S3 object exists only
        once its upload completed."""
        self.fs.makedirs(d, exist_ok=True)
        target = posixpath.join(d, name)
        if self._protocol in ("", "file://"):
            tmp = posixpath.join(d, f".{name}.{uuid.uuid4().hex}.tmp")
            with self.fs.open(tmp, "wb") as f:
                f.write(payload)
            self.fs.mv(tmp, target)
        else:
            with self.fs.open(target, "wb") as f:
                f.write(payload)

    def read_file(self, ref: StepRef, name: str) -> bytes:
        """An extra file of a finished step (one its manifest lists)."""
        m = self.manifest(ref.run, ref.step, ref.key)
        if m is None:
            raise StepNotFoundError(f"{ref.uri}: no {MANIFEST}; the step never completed")
        if name not in m.files_extra:
            raise FileNotFoundError(f"{ref.uri}: no extra file {name!r} (has: {', '.join(sorted(m.files_extra)) or 'none'})")
        with self.fs.open(posixpath.join(self._dir(ref.run, ref.step, ref.key), name), "rb") as f:
            return f.read()

    def commit(self, parts: Sequence[Part], run: str, step: str, key: str, upstream: Sequence[str] = (),
               meta: dict | None = None, files_extra: Mapping[str, str] | None = None) -> Manifest:
        """Write the manifest over ``parts`` (in their order) and the extra files already written (name ->
        sha256): from now on the step counts as done."""
        if not parts:
            raise StepValidationError(f"step {step!r}: no parts to commit")
        files = {p.name: p.sha256 for p in parts}
        extra = dict(files_extra or {})
        # the digest covers every file of the version (the same as before for a step without extra files)
        digest = hashlib.sha256(json.dumps({**files, **extra}, sort_keys=True).encode()).hexdigest()
        manifest = Manifest(
            run=run, step=step, key=key, uri=self.uri(run, step, key), rows=sum(p.rows for p in parts), digest=digest,
            columns=parts[0].columns, files=files, upstream=list(upstream), code_version=code_version(),
            created_at=dt.datetime.now(dt.timezone.utc).isoformat(), meta=meta or {}, files_extra=extra,
        )
        with self.fs.open(posixpath.join(self._dir(run, step, key), MANIFEST), "w") as f:  # last: marks it done
            f.write(manifest.model_dump_json(indent=2))
        return manifest

    # --- read -----------------------------------------------------------------------------------------
    def manifest(self, run: str, step: str, key: str) -> Manifest | None:
        d = self._dir(run, step, key)
        path = posixpath.join(d, MANIFEST)
        self.fs.invalidate_cache(d)  # another process or thread may have committed it since we last listed
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
        return concat_parts(tables).to_pandas(), m.uri

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

    def read_columns(self, ref: StepRef, columns: list[str]) -> pd.DataFrame:
        """Only some columns of a finished step (those it has), all parts."""
        m = self.manifest(ref.run, ref.step, ref.key)
        if m is None:
            raise StepNotFoundError(f"{ref.uri}: no {MANIFEST}; the step never completed")
        wanted = [c for c in columns if c in m.columns]
        d = self._dir(ref.run, ref.step, ref.key)
        tables = []
        for name in sorted(m.files):
            with self.fs.open(posixpath.join(d, name), "rb") as f:
                tables.append(pq.read_table(f, columns=wanted))
        return concat_parts(tables).to_pandas()

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
