"""The magics are parsers: assert on the spec each one builds, with the engine patched out."""

import subprocess
import sys

import pytest
from IPython.core.interactiveshell import InteractiveShell

from nbalign.errors import NbalignError
from nbalign.specs import SFTSpec


@pytest.fixture
def ip():
    shell = InteractiveShell.instance()
    shell.run_line_magic("load_ext", "nbalign")
    yield shell
    shell.user_ns.pop("run", None)


@pytest.fixture
def captured(monkeypatch):
    """Replace the SFT engine: record the spec the magic built."""
    specs = []

    def fake_engine(spec):
        specs.append(spec)
        return "RUN"

    monkeypatch.setattr("nbalign.methods.sft.sft", fake_engine)
    return specs


def test_sft_magic_builds_the_spec_from_line_and_body(ip, captured):
    ip.user_ns["chats"] = [{"prompt": "a", "completion": "b"}]
    result = ip.run_cell_magic(
        "sft", "--data chats --out runs/x -o run --epochs 2 --no-packing",
        "learning_rate: 2e-4\nbatch_size: 4\nweight_decay: 0.1\nepochs: 5\n",
    )
    (spec,) = captured
    assert isinstance(spec, SFTSpec)
    assert spec.data is ip.user_ns["chats"]  # a notebook variable, resolved by name
    assert spec.out == "runs/x"
    assert spec.epochs == 2.0  # the line wins over the body
    assert spec.learning_rate == pytest.approx(2e-4) and spec.batch_size == 4 and spec.packing is False
    assert spec.trl == {"weight_decay": 0.1}  # a TRL SFTConfig field, passed through
    assert spec.model == "smollm2-135m"
    assert result == "RUN" and ip.user_ns["run"] == "RUN"


def test_sft_magic_takes_a_path_when_no_variable_has_that_name(ip, captured):
    import nbalign
    from nbalign.adapters import AdapterSpec

    nbalign.session.adapter = AdapterSpec(r=8, target_modules=["q_proj", "v_proj"], dropout=0.1)
    ip.run_cell_magic("sft", "--data data/chats.jsonl --model runs/sft1", "lora: {r: 4}")
    assert captured[0].data == "data/chats.jsonl" and captured[0].model == "runs/sft1"
    # The spec holds the whole adapter: the session's %%lora setting with the cell's override on top.
    assert captured[0].lora == AdapterSpec(r=4, target_modules=["q_proj", "v_proj"], dropout=0.1)


def test_lora_magic_sets_the_session_adapter_and_reports_cost(ip, capsys):
    from nbalign import session

    ip.run_cell_magic("lora", "", "r: 8\nalpha: 16\ntarget_modules: [q_proj, v_proj]\n")
    assert session.adapter.r == 8 and session.adapter.target_modules == ["q_proj", "v_proj"]
    out = capsys.readouterr().out
    # SmolLM2-135M: 30 layers x (q: 576->576, v: 576->192) -> 30 * 8 * (576+576 + 576+192) = 460,800
    assert "trainable parameters 460,800" in out and "base weights about" in out


@pytest.mark.parametrize("magic", ["lora", "sft"])
def test_help_renders_for_every_magic(ip, capsys, magic):
    for cell in (f"%{magic} --help", f"%%{magic} --help\n# options go here\n"):
        assert ip.run_cell(cell).success
        text = capsys.readouterr().out
        assert f"usage: %%{magic}" in text and ("--out" in text if magic == "sft" else "--r R" in text), text
    # `%%sft?` shows the same help (the magic's docstring).
    doc = ip.find_cell_magic(magic).__doc__
    assert "usage:" in doc and "--help" in doc


def test_nbalign_line_magic(ip, capsys, tmp_path):
    ip.run_line_magic("nbalign", "help")
    assert "%nbalign runs" in capsys.readouterr().out
    frame = ip.run_line_magic("nbalign", f"runs {tmp_path}")
    assert list(frame.columns)[:3] == ["run", "method", "model"] and len(frame) == 0


@pytest.mark.parametrize(
    "line, cell, message",
    [
        ("--data x --epocs 3", "", "did you mean '--epochs'"),
        ("--data x --model", "epochs: 1", "--model: expected one argument"),
        ("--data x", "epochs: [3\n", "not valid YAML at line 2 of the cell, `epochs: [3` (a `[` that is never closed)"),
        ("--data x", "epochs: 3\nseed: 1\nlora: {r: 8\nbatch_size: 2\n", "at line 4 of the cell, `lora: {r: 8`"),
        ("--data x", "epochs: 3\nepochs: 4\n", "at line 3 of the cell, `epochs: 4` (the key 'epochs' is given twice)"),
        ("--data x", "epochs: 3\n\tseed: 1\n", "(a tab character). Fix: indent with spaces"),
        ("--data x", "epochs 3\nseed: 1\n", "line 2 of the cell, `epochs 3` (a line that is not `key: value`)"),
        ("--data x", "- just a list", "must be `key: value` lines"),
        ("--data x", "epochs: many", "'epochs' must be a float"),
        ("", "", "no training data"),
    ],
)
def test_bad_input_is_one_paragraph_without_traceback(ip, captured, capsys, line, cell, message):
    result = ip.run_cell(f"%%sft {line}\n{cell}" if cell else f"%sft {line}")
    assert isinstance(result.error_in_exec, NbalignError)
    assert not captured
    out = capsys.readouterr()
    text = out.out + out.err
    assert message.replace("\\", "") in " ".join(text.split()) or pytest.fail(text)
    assert "Traceback" not in text and text.count("\n") <= 3


def test_unknown_trl_field_is_rejected_with_the_nearest_name(ip, tiny_model, in_tmp):
    # Checked against TRL's SFTConfig before anything is written or loaded.
    (in_tmp / "x.jsonl").write_text('{"prompt": "a", "completion": "b"}\n')
    result = ip.run_cell(f"%%sft --data x.jsonl --model {tiny_model}\nlr_scheduler_typ: cosine\n")
    assert "did you mean 'lr_scheduler_type'" in str(result.error_in_exec)
    assert not (in_tmp / "runs").exists()


def test_load_ext_loads_no_heavy_library():
    # How long it takes is measured in bench/bench_import.py, not asserted here.
    code = (
        "import sys\n"
        "from IPython.core.interactiveshell import InteractiveShell\n"
        "ip = InteractiveShell.instance()\n"
        "ip.run_line_magic('load_ext', 'nbalign')\n"
        "heavy = [m for m in ('torch', 'transformers', 'trl', 'peft', 'datasets') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "assert ip.find_cell_magic('sft') and ip.find_cell_magic('lora') and ip.find_line_magic('nbalign')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr


@pytest.mark.parametrize("magic", ["sft", "dpo", "kto", "reward_model", "rlhf"])
def test_help_shows_each_default_from_its_one_definition(ip, capsys, magic):
    """The learning rate (per method and adapter) and DPO's beta are defined once, on the spec class; the help
    shows that definition and the run uses it (tests/test_engine.py, test_preference.py)."""
    from nbalign.api import METHODS

    spec_class = METHODS[magic][0]
    ip.run_line_magic(magic, "--help")
    text = " ".join(capsys.readouterr().out.split())
    adapter, full = spec_class.learning_rates
    assert f"default {adapter:.0e} with an adapter, {full:.0e} for full fine-tuning".replace("e-0", "e-") in text
    assert "%%lora" in text
    if magic == "dpo":
        from nbalign.preference_specs import BETAS, DEFAULT_BETA

        assert DEFAULT_BETA == 0.1 and BETAS == {"simpo": 2.0}  # and test_preference.py sees them in the runs
        assert "default 0.1 (simpo: 2)" in text


@pytest.fixture
def engines(monkeypatch):
    """Replace every preference engine: record (method, spec)."""
    seen = []
    for module, name in [("dpo", "dpo"), ("kto", "kto"), ("reward", "reward_model"), ("rlhf", "rlhf")]:
        monkeypatch.setattr(f"nbalign.methods.{module}.{name}", lambda spec, name=name: seen.append((name, spec)))
    return seen


def test_preference_magics_build_their_specs(ip, engines):
    from nbalign.preference_specs import DPOSpec, KTOSpec, RewardSpec, RLHFSpec

    ip.user_ns["prefs"] = [{"prompt": "a", "chosen": "b", "rejected": "c"}]
    ip.run_cell_magic("dpo", "--model runs/json-sft --data prefs --out runs/dpo1",
                      "beta: 0.2\nloss: {sigmoid: 0.8, bco_pair: 0.2}\nlabel_smoothing: 0.1\n")
    ip.run_line_magic("kto", "--data prefs --unpair")
    ip.run_line_magic("reward_model", "--data prefs --out runs/rm1")

    def short(prompts, completions, **kw):
        return [-len(c) for c in completions]

    ip.user_ns["short"], ip.user_ns["kw"] = short, short
    ip.run_cell_magic("rlhf", "--data prefs --reward short,kw", "algorithm: rloo")
    (_, dpo), (_, kto), (_, rm), (_, rl) = engines
    assert isinstance(dpo, DPOSpec) and dpo.beta == 0.2 and dpo.loss == {"sigmoid": 0.8, "bco_pair": 0.2}
    assert dpo.model == "runs/json-sft" and dpo.data is ip.user_ns["prefs"] and dpo.trl == {"label_smoothing": 0.1}
    assert isinstance(kto, KTOSpec) and kto.unpair is True
    assert isinstance(rm, RewardSpec) and rm.out == "runs/rm1"
    assert isinstance(rl, RLHFSpec) and rl.reward == [short, short] and rl.algorithm == "rloo"


def test_preference_magics_have_help(ip, capsys):
    for name in ("dpo", "kto", "reward_model", "rlhf"):
        ip.run_line_magic(name, "--help")
        assert f"%%{name}" in capsys.readouterr().out


def test_label_data_and_live_on_the_magic_line(ip, engines, in_tmp, monkeypatch):
    """`%%dpo --data labels` with a labeller in the notebook, `%%reward_model --data <store path>`, and
    `%%dpo --data labels --live`: the magic passes them on as one API call each."""
    from nbalign.labeling.store import LabelStore

    store = LabelStore("labels/support.sqlite", labeller="ann")
    ids = store.add_items([{"prompt": "q", "a": "short", "b": "a long answer"},
                           {"prompt": "r", "a": "x", "b": "y"}])
    store.label(ids[0], "A")
    store.label(ids[1], "tie")

    class Labeller:
        pass

    labels = Labeller()
    labels.store = store
    ip.user_ns["labels"] = labels
    ip.run_line_magic("dpo", "--data labels --ties both_ways")
    ip.run_line_magic("reward_model", "--data labels/support.sqlite")
    ip.run_line_magic("kto", "--data labels --both-bad drop")
    (_, dpo), (_, rm), (_, kto) = engines
    assert [(r["chosen"], r["rejected"]) for r in dpo.data] == [("short", "a long answer"), ("x", "y"), ("y", "x")]
    assert [(r["chosen"], r["rejected"]) for r in rm.data] == [("short", "a long answer")]
    assert [(r["completion"], r["label"]) for r in kto.data] == [("short", True), ("a long answer", False)]

    started = []
    monkeypatch.setattr("nbalign.api.live", lambda spec: started.append(spec))
    ip.run_line_magic("dpo", "--data labels --live --live-every 4")
    assert started[0].live is True and started[0].live_every == 4 and started[0].data is labels


def test_merge_magic_builds_its_spec_from_line_and_body(ip, monkeypatch, capsys):
    seen = []
    monkeypatch.setattr("nbalign.methods.merge.merge", lambda spec: seen.append(spec) or "merged")
    ip.run_cell_magic("merge", "--out runs/both -o m --weights 0.6,0.4",
                      "runs: [runs/json-sft, runs/terse-dpo]\nmethod: TIES\ndensity: 0.5\n")
    spec = seen[0]
    assert spec.runs == ["runs/json-sft", "runs/terse-dpo"] and spec.method == "ties" and spec.density == 0.5
    assert spec.weights == [0.6, 0.4] and spec.out == "runs/both" and ip.user_ns["m"] == "merged"
    assert ip.run_cell("%merge --help").success and "usage: %%merge" in capsys.readouterr().out
    result = ip.run_cell("%%merge\nruns: [runs/a]\n")
    assert isinstance(result.error_in_exec, NbalignError) and "at least two runs" in str(result.error_in_exec)
