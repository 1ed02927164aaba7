"""The training data as the trainers read it: TRL conversational SFT and preference rows, LLaMA-Factory alpaca
JSON files with their ``dataset_info.json``, a Hugging Face ``datasets`` directory with a dataset card.

Plain functions of frames and config. The rows a function returns are its step's Parquet output; the files an
export needs beside them (JSON, a card, the per-config Parquet files) travel with the frame in
``frame.attrs[FILES_ATTR]`` ({name: bytes}), and the store writes them into the step's directory before the
manifest. Only kept rows come in (the runtime drops the others), so every exported example is a kept one.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
from typing import Any, Iterable

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from pydantic import BaseModel

from autoif.config import ExportsConfig, RunConfig

# the key of ``DataFrame.attrs`` the store writes beside a step's parts (``autoif.store.FILES_ATTR``; a task
# module may not import the store)
FILES_ATTR = "autoif.files"

TRL_SFT_COLUMNS = ["messages", "sft_id", "instruction_id", "query_id", "pass_rate", "score", "func_ids", "verifier_source"]
TRL_DPO_COLUMNS = ["prompt", "chosen", "rejected", "dpo_id", "level", "chosen_pass_rate", "rejected_pass_rate",
                   "chosen_score", "func_ids", "verifier_source", "instruction_id", "query_id", "chosen_source",
                   "rejected_source"]
LLAMAFACTORY_COLUMNS = ["format", "example_id", "file", "instruction", "input", "output", "chosen", "rejected", "history",
                        "level"]
HF_COLUMNS = ["config", "example_id", "file"]
HF_CONFIGS = ("sft", "dpo")
DATASET_INFO = "dataset_info.json"
CARD = "README.md"

_MESSAGE = pa.struct([("role", pa.string()), ("content", pa.string())])
_MESSAGES = pa.list_(_MESSAGE)
HF_SCHEMAS = {
    "sft": pa.schema([("messages", _MESSAGES), ("sft_id", pa.string()), ("instruction_id", pa.string()),
                      ("query_id", pa.string()), ("pass_rate", pa.float64()), ("score", pa.float64()),
                      ("func_ids", pa.string()), ("verifier_source", pa.string())]),
    "dpo": pa.schema([("prompt", _MESSAGES), ("chosen", _MESSAGES), ("rejected", _MESSAGES), ("dpo_id", pa.string()),
                      ("level", pa.string()), ("chosen_pass_rate", pa.float64()), ("rejected_pass_rate", pa.float64()),
                      ("chosen_score", pa.float64()), ("func_ids", pa.string()), ("verifier_source", pa.string()),
                      ("instruction_id", pa.string()), ("query_id", pa.string()), ("chosen_source", pa.string()),
                      ("rejected_source", pa.string())]),
}


def with_files(frame: pd.DataFrame, files: dict[str, bytes]) -> pd.DataFrame:
    """``frame`` carrying ``files`` for the store to write beside it (set last: pandas copies attrs along)."""
    frame.attrs[FILES_ATTR] = dict(files)
    return frame


def _value(v: Any) -> Any:
    """A cell as plain JSON: NaN and pandas' missing values become None."""
    if v is None or v is pd.NA or (isinstance(v, float) and math.isnan(v)):
        return None
    return v.item() if hasattr(v, "item") else v


def _turn(role: str, content: str) -> list[dict[str, str]]:
    return [{"role": role, "content": str(content)}]


# --- TRL --------------------------------------------------------------------------------------------------


def trl_sft(sft: pd.DataFrame) -> pd.DataFrame:
    """TRL's conversational language-modelling format: ``messages`` = the user's prompt (query + instruction)
    and the verified response, with the row's provenance."""
    rows = [{"messages": _turn("user", r.prompt) + _turn("assistant", r.response), "sft_id": r.sft_id,
             "instruction_id": r.instruction_id, "query_id": r.query_id, "pass_rate": float(r.pass_rate),
             "score": float(r.score), "func_ids": r.func_ids, "verifier_source": r.verifier_source}
            for r in sft.itertuples()]
    return pd.DataFrame(rows, columns=TRL_SFT_COLUMNS)


def _pairs(query_dpo: pd.DataFrame, instruction_dpo: pd.DataFrame, cfg: ExportsConfig) -> pd.DataFrame:
    """The kept pairs of the levels ``cfg.dpo_levels`` asks for, query-level first."""
    frames = [f for f, level in ((query_dpo, "query"), (instruction_dpo, "instruction")) if level in cfg.dpo_levels and len(f)]
    if not frames:
        return query_dpo.iloc[0:0]
    pairs = pd.concat(frames, ignore_index=True)
    return pairs[pairs["level"].isin(cfg.dpo_levels)].reset_index(drop=True)


def trl_dpo(query_dpo: pd.DataFrame, instruction_dpo: pd.DataFrame, cfg: ExportsConfig) -> pd.DataFrame:
    """TRL's conversational preference format: ``prompt`` = the user turn, ``chosen`` / ``rejected`` = one
    assistant turn each; query-level and instruction-level pairs (``level``) with their pass rates and
    source rows."""
    rows = [{"prompt": _turn("user", r.prompt), "chosen": _turn("assistant", r.chosen),
             "rejected": _turn("assistant", r.rejected), "dpo_id": r.dpo_id, "level": r.level,
             "chosen_pass_rate": _value(r.chosen_pass_rate), "rejected_pass_rate": _value(r.rejected_pass_rate),
             "chosen_score": _value(r.chosen_score), "func_ids": r.func_ids, "verifier_source": r.verifier_source,
             "instruction_id": r.instruction_id, "query_id": _value(r.query_id), "chosen_source": _value(r.chosen_source),
             "rejected_source": _value(r.rejected_source)}
            for r in _pairs(query_dpo, instruction_dpo, cfg).itertuples()]
    out = pd.DataFrame(rows, columns=TRL_DPO_COLUMNS)
    for c in ("chosen_pass_rate", "rejected_pass_rate", "chosen_score"):
        out[c] = out[c].astype(float)
    return out


# --- LLaMA-Factory ----------------------------------------------------------------------------------------


def llamafactory_names(cfg: ExportsConfig) -> dict[str, str]:
    """The dataset names (``dataset_info.json`` keys, what ``--dataset`` takes) and their file names."""
    return {"sft": f"{cfg.dataset_name}_sft", "dpo": f"{cfg.dataset_name}_dpo"}


def dataset_info(cfg: ExportsConfig, files: dict[str, bytes]) -> dict[str, dict]:
    """LLaMA-Factory's dataset descriptions (data/README.md of hiyouga/LLaMA-Factory): alpaca SFT and alpaca
    preference (``ranking``), each with its file's SHA-1."""
    names = llamafactory_names(cfg)
    sft_file, dpo_file = f"{names['sft']}.json", f"{names['dpo']}.json"
    return {
        names["sft"]: {"file_name": sft_file, "file_sha1": hashlib.sha1(files[sft_file]).hexdigest(), "formatting": "alpaca",
                       "columns": {"prompt": "instruction", "query": "input", "response": "output", "history": "history"}},
        names["dpo"]: {"file_name": dpo_file, "file_sha1": hashlib.sha1(files[dpo_file]).hexdigest(), "formatting": "alpaca",
                       "ranking": True,
                       "columns": {"prompt": "instruction", "query": "input", "chosen": "chosen", "rejected": "rejected"}},
    }


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, ensure_ascii=False, indent=2) + "\n").encode()


def llamafactory(sft: pd.DataFrame, query_dpo: pd.DataFrame, instruction_dpo: pd.DataFrame, cfg: ExportsConfig) -> pd.DataFrame:
    """LLaMA-Factory's alpaca SFT (``instruction``, ``input``, ``output``, ``history``) and alpaca preference
    (``instruction``, ``input``, ``chosen``, ``rejected``) files plus ``dataset_info.json``; the rows are every
    exported example (``format`` sft or dpo) as written. ``instruction`` is the whole user turn (query +
    instruction, as TRL's prompt) and ``input`` is empty, so LLaMA-Factory's prompt is exactly the TRL one."""
    names = llamafactory_names(cfg)
    sft_records = [{"instruction": r.prompt, "input": "", "output": r.response, "history": []} for r in sft.itertuples()]
    pairs = _pairs(query_dpo, instruction_dpo, cfg)
    dpo_records = [{"instruction": r.prompt, "input": "", "chosen": r.chosen, "rejected": r.rejected}
                   for r in pairs.itertuples()]
    files = {f"{names['sft']}.json": _json_bytes(sft_records), f"{names['dpo']}.json": _json_bytes(dpo_records)}
    files[DATASET_INFO] = _json_bytes(dataset_info(cfg, files))
    rows = [{"format": "sft", "example_id": r.sft_id, "file": f"{names['sft']}.json", "instruction": rec["instruction"],
             "input": rec["input"], "output": rec["output"], "chosen": None, "rejected": None,
             "history": json.dumps(rec["history"]), "level": None}
            for r, rec in zip(sft.itertuples(), sft_records)]
    rows += [{"format": "dpo", "example_id": r.dpo_id, "file": f"{names['dpo']}.json", "instruction": rec["instruction"],
              "input": rec["input"], "output": None, "chosen": rec["chosen"], "rejected": rec["rejected"], "history": None,
              "level": r.level}
             for r, rec in zip(pairs.itertuples(), dpo_records)]
    return with_files(pd.DataFrame(rows, columns=LLAMAFACTORY_COLUMNS), files)


# --- Hugging Face datasets directory with a dataset card -------------------------------------------------


class FunnelRow(BaseModel):
    step: str
    rows_in: int
    rows_out: int
    reasons: dict[str, int] = {}
    digest: str = ""  # the step output's version (manifest digest, short)


class CardFacts(BaseModel):
    """What the dataset card says about the run that made the data: a fixed parameter of the HF export step
    (part of its key), gathered by :func:`card_facts` from the config and the run's step manifests."""

    run_name: str
    preset: str
    seed: int
    setting: str
    queries_source: str
    queries_licence: str
    license_id: str  # the card's YAML ``license``
    generation: dict[str, str]
    funnel: list[FunnelRow]


BUILTIN_QUERIES_LICENCE = "the built-in queries: Apache-2.0, written for autoif-flow"


def card_facts(cfg: RunConfig, funnel: Iterable[dict]) -> CardFacts:
    """The card's facts: run, preset, the queries' source and licence, generation settings, and ``funnel``
    (per step of the run: ``step``, ``rows_in``, ``rows_out``, ``reasons``, ``digest``: the manifests'
    ``meta["funnel"]`` and digests)."""
    builtin = cfg.queries.path is None
    licence = cfg.exports.queries_licence or (BUILTIN_QUERIES_LICENCE if builtin else f"see the source ({cfg.queries.path})")
    generation = {
        "engine": f"{cfg.engine.kind.value}:{cfg.engine.model}",
        "verifier_synthesis.n_completions": str(cfg.verifier_synthesis.n_completions),
        "verifier_synthesis.temperature": str(cfg.verifier_synthesis.temperature),
        "cross_validation.case_accuracy": str(cfg.cross_validation.case_accuracy),
        "cross_validation.func_accuracy": str(cfg.cross_validation.func_accuracy),
        "consistency_filter.mode": cfg.consistency_filter.mode.value,
        "query_augmentation.queries_per_instruction": str(cfg.query_augmentation.queries_per_instruction),
        "response_generation.n_responses": str(cfg.response_generation.n_responses),
        "response_generation.temperature": str(cfg.response_generation.temperature),
        "response_generation.max_tokens": str(cfg.response_generation.max_tokens),
        "verification.pass_rate": str(cfg.verification.pass_rate),
        "quality_filter.score": str(cfg.quality_filter.score),
        "contamination.ngram": f"{cfg.contamination.ngram}-gram vs {', '.join(cfg.contamination.benchmarks)}"
                         if cfg.contamination.check else "off",
        "pairs.chosen_pass_rate": str(cfg.pairs.chosen_pass_rate),
        "pairs.rejected_pass_rate": str(cfg.pairs.rejected_pass_rate),
        "pairs.max_per_prompt": f"{cfg.pairs.max_chosen_per_prompt} x {cfg.pairs.max_rejected_per_prompt}",
        "exports.dpo_levels": ", ".join(cfg.exports.dpo_levels),
    }
    return CardFacts(run_name=cfg.run_name, preset=cfg.preset.value, seed=cfg.seed, setting=cfg.setting.value,
                     queries_source="built-in (autoif/data/queries.jsonl)" if builtin else str(cfg.queries.path),
                     queries_licence=licence, license_id="apache-2.0" if builtin and not cfg.exports.queries_licence else "other",
                     generation=generation, funnel=[FunnelRow(**f) for f in funnel])


def _messages(v: Any) -> list[dict[str, str]]:
    """A conversation read back from Parquet (an array of dicts) as plain ``[{"role", "content"}]``."""
    return [{"role": str(m["role"]), "content": str(m["content"])} for m in list(v)]


def _parquet(frame: pd.DataFrame, schema: pa.Schema, message_columns: tuple[str, ...]) -> bytes:
    data = {c: ([_messages(v) for v in frame[c]] if c in message_columns else [_value(v) for v in frame[c]])
            for c in schema.names}
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pydict(data, schema=schema), buf)
    return buf.getvalue()


def hf_file(config: str) -> str:
    return f"{config}-00000.parquet"


def card(facts: CardFacts, cfg: ExportsConfig, counts: dict[str, int], levels: dict[str, int]) -> str:
    """The dataset card: YAML front matter (``configs`` whose ``data_files`` match only this directory's
    per-config Parquet files, licence, tags) and the run's source, licence, generation settings and funnel."""
    front = {
        "pretty_name": f"{cfg.dataset_name} (AutoIF run {facts.run_name})",
        "license": facts.license_id,
        "language": ["en"],
        "task_categories": ["text-generation"],
        "tags": ["autoif", "instruction-following", "sft", "dpo", "synthetic"],
        "configs": [{"config_name": c, "data_files": [{"split": "train", "path": f"{c}-*.parquet"}], **({"default": True} if c == "sft" else {})}
                    for c in HF_CONFIGS],
    }
    level_text = ", ".join(f"{n} {lvl}-level" for lvl, n in levels.items()) or "none"
    lines = [
        "---", yaml.safe_dump(front, sort_keys=False).rstrip(), "---", "",
        f"# {cfg.dataset_name}: AutoIF instruction-following data (run `{facts.run_name}`)", "",
        "Made by autoif-flow, an implementation of [AutoIF](https://arxiv.org/abs/2406.13542) (ICLR 2025): LLM-written "
        "instructions with Python verification functions cross-validated on test cases; responses kept only when "
        "the functions pass them and a relevance judge scores them high enough.", "",
        "## Configs", "",
        f"- `sft` ({counts['sft']} rows): TRL conversational `messages` (user: query + instruction, assistant: a verified "
        "response), with `sft_id`, `instruction_id`, `query_id`, `pass_rate`, `score`, `func_ids`, `verifier_source`.",
        f"- `dpo` ({counts['dpo']} pairs: {level_text}): TRL conversational preference `prompt` / `chosen` / `rejected`, "
        "with `level`, the pass rates, `chosen_score`, `func_ids`, `verifier_source` and the source rows.", "",
        "```python", "from datasets import load_dataset", "",
        'sft = load_dataset("path/to/this/directory", "sft", split="train")',
        'dpo = load_dataset("path/to/this/directory", "dpo", split="train")', "```", "",
        "## Source", "",
        f"- run: `{facts.run_name}`, preset `{facts.preset}`, setting `{facts.setting}`, seed {facts.seed}",
        f"- queries: {facts.queries_source}", "",
        "## Licence", "",
        f"- queries: {facts.queries_licence}",
        f"- responses were written by the model `{facts.generation.get('engine', '?')}`; its terms apply to them", "",
        "## Generation settings", "", "| setting | value |", "|---|---|",
        *[f"| {k} | {v} |" for k, v in facts.generation.items()], "",
        "## Funnel", "", "| step | in | kept | top drop reasons | version |", "|---|---:|---:|---|---|",
    ]
    for f in facts.funnel:
        top = sorted(f.reasons.items(), key=lambda kv: (-kv[1], kv[0]))[:3]
        lines.append(f"| {f.step} | {f.rows_in} | {f.rows_out} | {', '.join(f'{r} {c}' for r, c in top) or '-'} | "
                     f"{f.digest[:12] or '-'} |")
    return "\n".join(lines) + "\n"


def hf_dataset(sft: pd.DataFrame, dpo: pd.DataFrame, cfg: ExportsConfig, card_facts: CardFacts) -> pd.DataFrame:
    """A directory ``datasets.load_dataset(dir, "sft" | "dpo")`` reads: one Parquet file per config (the TRL
    exports' rows) and ``README.md``, the dataset card. The rows index the examples: config, id, file."""
    facts = card_facts
    files = {hf_file("sft"): _parquet(sft, HF_SCHEMAS["sft"], ("messages",)),
             hf_file("dpo"): _parquet(dpo, HF_SCHEMAS["dpo"], ("prompt", "chosen", "rejected"))}
    levels = {str(k): int(v) for k, v in dpo["level"].value_counts().items()} if len(dpo) else {}
    files[CARD] = card(facts, cfg, {"sft": len(sft), "dpo": len(dpo)}, levels).encode()
    rows = [{"config": "sft", "example_id": i, "file": hf_file("sft")} for i in sft["sft_id"]]
    rows += [{"config": "dpo", "example_id": i, "file": hf_file("dpo")} for i in dpo["dpo_id"]]
    return with_files(pd.DataFrame(rows, columns=HF_COLUMNS), files)
