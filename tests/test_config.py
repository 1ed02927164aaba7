import pytest

from autoif.config import Cmp, ConfigError, Preset, load_config


def test_presets_carry_the_method_numbers():
    code = load_config(preset="code")
    paper = load_config(preset="paper")
    cv = code.cross_validation
    assert (cv.min_unique_funcs, cv.min_unique_cases, cv.min_surviving_funcs) == (3, 10, 1)
    assert (cv.case_accuracy.op, cv.case_accuracy.value) == (Cmp.gt, 0.0)
    assert (cv.func_accuracy.op, cv.func_accuracy.value) == (Cmp.ge, 0.8)
    assert (paper.cross_validation.case_accuracy.op, paper.cross_validation.case_accuracy.value) == (Cmp.gt, 0.5)
    assert (paper.cross_validation.func_accuracy.op, paper.cross_validation.func_accuracy.value) == (Cmp.gt, 0.5)
    assert str(code.verification.pass_rate) == "> 0" and str(paper.verification.pass_rate) == "> 0.5"
    assert str(code.quality_filter.score) == "> 8" and str(paper.quality_filter.score) == ">= 8"
    assert (code.train.dpo["beta"], code.train.dpo["learning_rate"]) == (0.1, 5e-6)
    assert (paper.train.dpo["beta"], paper.train.dpo["learning_rate"], paper.train.dpo["num_train_epochs"]) == (0.3, 5e-7, 2.0)
    assert paper.train.dpo["lr_scheduler_type"] == "cosine" and paper.train.dpo["loss_type"] == ["sigmoid"]
    assert code.back_translation.max_funcs == 3 and code.query_augmentation.queries_per_instruction == 16
    assert code.online.temperature == 0.8 and str(code.online.chosen_pass_rate) == "> 0.5"
    assert paper.preset is Preset.paper


def test_threshold_semantics():
    code = load_config(preset="code")
    assert code.cross_validation.func_accuracy.holds(0.8)
    assert not load_config(preset="paper").cross_validation.func_accuracy.holds(0.5)
    assert code.pairs.rejected_pass_rate.holds(0.0) and not code.pairs.rejected_pass_rate.holds(0.1)


def test_yaml_then_overrides(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("preset: paper\nrun_name: weekly\nself_instruct:\n  n_calls: 7\n")
    cfg = load_config(f, overrides=["self_instruct.n_calls=9", "cross_validation.func_accuracy=0.6", "engine.kind=openai"])
    assert cfg.run_name == "weekly" and cfg.preset is Preset.paper
    assert cfg.self_instruct.n_calls == 9
    # a bare number on a threshold keeps the preset's comparison
    assert (cfg.cross_validation.func_accuracy.op, cfg.cross_validation.func_accuracy.value) == (Cmp.gt, 0.6)
    assert cfg.engine.kind.value == "openai"
    cfg2 = load_config(f, preset="code", overrides={"cross_validation.func_accuracy.op": ">"})
    assert cfg2.preset is Preset.code and cfg2.cross_validation.func_accuracy.op is Cmp.gt


@pytest.mark.parametrize(
    "override, needle",
    [
        ("cross_validation.min_func_accurasy=0.5", "cross_validation.min_func_accurasy"),
        ("nonsense=1", "'nonsense'"),
        ("self_instruct.n_calls=many", "self_instruct.n_calls"),
        ("engine.kind=gpt", "engine.kind"),
        ("self_instruct.n_calls", "key.path=value"),
    ],
)
def test_errors_name_the_key(override, needle):
    with pytest.raises(ConfigError) as e:
        load_config(overrides=[override])
    assert needle in str(e.value)


def test_unknown_key_in_yaml(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("self_instruct:\n  n_callz: 3\n")
    with pytest.raises(ConfigError, match=r"self_instruct\.n_callz"):
        load_config(f)


def test_overrides_never_change_the_presets():
    load_config(overrides=["cross_validation.func_accuracy=0.1", "verification.pass_rate.op=>="])
    fresh = load_config()
    assert str(fresh.cross_validation.func_accuracy) == ">= 0.8" and str(fresh.verification.pass_rate) == "> 0"


def test_self_alignment_refuses_a_policy_it_would_ignore():
    """self_alignment trains the supervision model: a policy model set by hand is an error, not silently dropped."""
    with pytest.raises(ConfigError, match="self_alignment.*policy.model_path.*strong_to_weak"):
        load_config(overrides=["policy.model_path=/models/other"])
    cfg = load_config(overrides=["setting=strong_to_weak", "policy.model=other", "policy.model_path=/models/other"])
    assert cfg.policy.model_path == "/models/other"
    assert load_config(overrides=["engine.model=m2"]).policy.model == "m2"  # unset: follows the engine
