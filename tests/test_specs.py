import pytest

from nbalign.errors import NbalignError
from nbalign.adapters import AdapterSpec
from nbalign.specs import SFTSpec


def test_yaml_strings_are_coerced_to_field_types():
    # PyYAML reads 2e-4 as a string; the spec must still get a float.
    spec = SFTSpec.from_dict({"data": "x.jsonl", "learning_rate": "2e-4", "epochs": "2", "packing": "yes"})
    assert spec.learning_rate == pytest.approx(2e-4)
    assert spec.epochs == 2.0 and spec.packing is True


def test_unknown_key_without_passthrough_names_the_nearest_field():
    with pytest.raises(NbalignError, match="did you mean 'alpha'"):
        AdapterSpec.from_dict({"alpah": 8})


def test_unknown_keys_pass_through_to_trl_for_methods():
    spec = SFTSpec.from_dict({"data": "x.jsonl", "warmup_ratio": 0.1}, passthrough=True)
    assert spec.trl == {"warmup_ratio": 0.1}


@pytest.mark.parametrize(
    "values, message",
    [
        ({"r": 0}, "'r' must be at least 1"),
        ({"dropout": 1.5}, "'dropout' must be in"),
        ({"type": "adalora"}, "'type' must be one of"),
        ({"quantize": "3bit"}, "'quantize' must be one of"),
        ({"type": "full", "quantize": "4bit"}, "full fine-tuning cannot train 4-bit"),
        ({"r": "many"}, "'r' must be an int"),
    ],
)
def test_adapter_spec_rejects_bad_values_with_a_fix(values, message):
    with pytest.raises(NbalignError, match=message) as info:
        AdapterSpec.from_dict(values)
    assert "Fix:" in str(info.value)


def test_adapter_spec_accepts_comma_separated_targets_and_defaults_alpha_to_twice_r():
    spec = AdapterSpec.from_dict({"target_modules": "q_proj, v_proj", "r": 4})
    assert spec.target_modules == ["q_proj", "v_proj"]
    assert spec.scaling_alpha == 8
    assert "QLoRA" in AdapterSpec(quantize="4BIT").describe()


def test_train_spec_checks():
    with pytest.raises(NbalignError, match="no training data"):
        SFTSpec.from_dict({})
    with pytest.raises(NbalignError, match="contradict"):
        SFTSpec.from_dict({"data": "x", "resume": True, "overwrite": True})
    with pytest.raises(NbalignError, match="'epochs' must be positive"):
        SFTSpec.from_dict({"data": "x", "epochs": 0})


def test_spec_is_json_serialisable_with_in_memory_data_fingerprinted():
    import json

    import pandas as pd

    frame = pd.DataFrame({"prompt": ["a"], "completion": ["b"]})
    d1 = SFTSpec(data=frame).to_dict()
    d2 = SFTSpec(data=frame.copy()).to_dict()
    json.dumps(d1)
    assert d1["data"]["rows"] == 1 and d1["data"]["fingerprint"] == d2["data"]["fingerprint"]
    assert SFTSpec(data=pd.DataFrame({"prompt": ["a"], "completion": ["c"]})).to_dict()["data"] != d1["data"]


def test_probe_from_the_line_is_a_bool_and_a_bad_probe_is_refused_before_any_model_loads():
    assert SFTSpec.from_dict({"data": "x.jsonl", "probe": "false"}).probe is False
    assert SFTSpec.from_dict({"data": "x.jsonl", "probe": "True"}).probe is True
    rows = [{"question": "What is 2 plus 2?", "answer": "4"}]
    assert SFTSpec.from_dict({"data": "x.jsonl", "probe": rows}).probe == rows
    for bad in (3, "maybe", [{"q": "What is 2 plus 2?"}]):
        with pytest.raises(NbalignError, match="'probe' must be true, false, or a list"):
            SFTSpec.from_dict({"data": "x.jsonl", "probe": bad})


def test_a_spec_without_batch_size_takes_fewer_rows_per_step_on_small_sft_data_and_records_them():
    """8 rows per step, or 4 where an SFT run would take fewer than MIN_STEPS optimizer steps at 8; a batch_size the
    cell gave, max_steps or gradient accumulation keep what they say; other methods keep 8."""
    from nbalign.methods.config import planned_steps, with_batch_size
    from nbalign.preference_specs import DPOSpec
    from nbalign.specs import DEFAULT_BATCH, MIN_STEPS

    def batch(spec, n, extra=None):
        chosen = with_batch_size(spec, n, extra or {})
        return chosen.batch_size, planned_steps(chosen, n, extra or {})

    sft = SFTSpec(data="x.jsonl")
    assert sft.batch_size is None
    assert batch(sft, 51) == (4, 39)  # the demo's data: 21 steps at 8
    assert batch(sft, 48) == (4, 36)  # the refusal data: 18 at 8
    assert batch(sft, 12) == (4, 9)  # not below 4 rows per step: fewer were not measured, and cost more time
    assert batch(sft, 80) == (8, 30) and batch(sft, 1000)[0] == DEFAULT_BATCH  # enough steps at 8 already
    assert batch(sft.replace(epochs=1), 51) == (4, 13) and batch(sft.replace(epochs=6), 51) == (8, 42)
    for n in range(1, 200):
        assert batch(sft, n)[0] == (8 if batch(sft.replace(batch_size=8), n)[1] >= MIN_STEPS else 4), n
    assert batch(sft.replace(batch_size=8), 51) == (8, 21)  # the cell's own choice
    assert batch(sft, 51, {"max_steps": 5})[0] == 8 and batch(sft, 51, {"gradient_accumulation_steps": 2})[0] == 8
    assert batch(DPOSpec(data="x.jsonl"), 51) == (8, 21)  # measured for SFT only: DPO at 4 over-refused more


def test_sft_help_says_how_the_batch_size_is_chosen():
    from nbalign.magics import build_parser

    text = build_parser(SFTSpec, "%%sft", "").format_help()
    assert "default 8, or 4 where the data would give fewer than 30 optimizer steps at 8" in " ".join(text.split())
