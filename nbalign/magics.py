"""IPython magics: parse the line options and YAML body into a spec, resolve notebook names, call the API,
display. No training logic lives here. Options are generated from the spec dataclasses."""

from __future__ import annotations

import argparse
import dataclasses
import keyword
import shlex
import typing

from IPython.core.magic import Magics, line_cell_magic, line_magic, magics_class

from .errors import NbalignError, unknown_option
from .preference_specs import DPOSpec, KTOSpec, RewardSpec, RLHFSpec
from .adapters import AdapterSpec
from .spec_fields import Spec, _base_type
from .methods.merge import MergeSpec
from .specs import SFTSpec

# Spec fields whose value may name a notebook variable (or, for `reward`, a list of them).
NAMESPACE_FIELDS = {"data", "eval_data", "general_text", "reward"}


class _Parser(argparse.ArgumentParser):
    """argparse that reports mistakes as NbalignError (one paragraph) instead of exiting the kernel."""

    def error(self, message):
        if "unrecognized arguments" in message:
            bad = message.split(":", 1)[1].split()[0]
            valid = [s for a in self._actions for s in a.option_strings if s.startswith("--")]
            raise unknown_option(bad, valid, self.prog)
        raise NbalignError(f"{self.prog}: {message}.", f"see `{self.prog} --help`.")

    def exit(self, status=0, message=None):
        raise _HelpShown()


class _HelpShown(Exception):
    pass


def build_parser(spec_cls: type[Spec], prog: str, description: str, extra: bool = True) -> _Parser:
    """Line options from the spec's fields: `--learning-rate 2e-4`, booleans as `--packing/--no-packing`."""
    parser = _Parser(
        prog=prog,
        description=description,
        epilog="Every option can also be given in the YAML body (learning_rate: 2.0e-4); the line wins when "
        "both set it." + (" The body also takes any TRL config field." if extra else ""),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        add_help=True,
    )
    hints = typing.get_type_hints(spec_cls)
    for f in dataclasses.fields(spec_cls):
        if not f.metadata.get("line", True):
            continue
        flag = "--" + f.name.replace("_", "-")
        base, _ = _base_type(hints[f.name])
        help_text = f.metadata.get("help", "")
        for key, value in (spec_cls.help_values() if hasattr(spec_cls, "help_values") else {}).items():
            help_text = help_text.replace("{" + key + "}", value)
        if not (f.default is None and "default" in help_text):
            shown = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            help_text += f" (default: {shown!r})"
        help_text = help_text.replace("%", "%%")  # argparse formats help with %: keep %%lora as written
        if base is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None,
                                help=help_text)
        else:
            parser.add_argument(flag, dest=f.name, default=None, metavar=f.name.upper(), help=help_text)
    parser.add_argument("-o", "--output-var", dest="_output_var", default=None, metavar="VAR",
                        help="store the result in this notebook variable")
    return parser


# PyYAML's wording -> what it means in a cell body, and its fix (None: the general one).
YAML_PROBLEMS = [
    ("given twice", None, "keep one of them."),
    ("'\\t'", "a tab character", "indent with spaces, not tabs."),
    ("flow mapping", "a `{` that is never closed", "close it, e.g. `lora: {r: 8}`."),
    ("flow sequence", "a `[` that is never closed", "close it, e.g. `target_modules: [q_proj, v_proj]`."),
    ("mapping values are not allowed", "a second ': ' in one value", "quote the value, e.g. `key: \"a: b\"`."),
    ("could not find expected ':'", "a line that is not `key: value`", None),
    ("found unexpected end of stream", "a quote that is never closed", "close the quote."),
]


def _read_body(prog: str, cell: str) -> dict:
    """The YAML body as a mapping. Errors name the line as the notebook shows it (the magic is line 1), quote
    it, and say how to fix it; a key given twice is refused rather than silently overwritten."""
    import yaml

    class _Loader(yaml.SafeLoader):
        pass

    def mapping(loader, node):
        keys = [loader.construct_object(k) for k, _ in node.value]
        twice = next((i for i, k in enumerate(keys) if k in keys[:i]), None)
        if twice is not None:
            raise yaml.constructor.ConstructorError(
                None, None, f"the key '{keys[twice]}' is given twice", node.value[twice][0].start_mark)
        return loader.construct_mapping(node)

    _Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)
    lines = cell.splitlines()
    try:
        loaded = yaml.load(cell, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        # Where the broken construct began (an unclosed bracket, a key without ':') is what the user must fix;
        # the scanner's own position can be the end of the cell.
        mark = getattr(exc, "context_mark", None) or getattr(exc, "problem_mark", None)
        row = min(mark.line, len(lines) - 1) if mark is not None and lines else None
        while row and ":" not in lines[row - 1] and lines[row - 1].strip() and not lines[row - 1].lstrip().startswith(
                "#"):
            row -= 1  # a plain line before runs on into this one: the line without ':' is the mistake
            exc.problem = "could not find expected ':'"
        where = f" at line {row + 2} of the cell, `{lines[row].strip()}`" if row is not None else ""
        problem = str(getattr(exc, "problem", None) or exc).strip()
        context = str(getattr(exc, "context", None) or "")
        fix = "write one `key: value` per line, e.g. `epochs: 3`; quote values that contain ': ' or '#'."
        for words, plain, better in YAML_PROBLEMS:
            if words in problem or words in context:
                problem, fix = plain or problem, better or fix
                break
        raise NbalignError(f"{prog}: the cell body is not valid YAML{where} ({problem}).", fix) from None
    if loaded is not None and not isinstance(loaded, dict):
        raise NbalignError(
            f"{prog}: the cell body must be `key: value` lines, got {type(loaded).__name__}.",
            "write one option per line, e.g. `epochs: 3`.",
        )
    return {str(k).replace("-", "_"): v for k, v in (loaded or {}).items()}


def parse_cell(parser: _Parser, line: str, cell: str | None) -> tuple[dict, str | None]:
    """Merge the YAML body with the line options (line wins); returns (values, output variable)."""
    body = _read_body(parser.prog, cell) if cell and cell.strip() else {}
    try:
        args = parser.parse_args(shlex.split(line or ""))
    except ValueError as exc:  # shlex: unbalanced quotes
        raise NbalignError(f"{parser.prog}: cannot read the line options ({exc}).", "balance the quotes.") from None
    given = {k: v for k, v in vars(args).items() if v is not None and not k.startswith("_")}
    return {**body, **given}, args._output_var


def _magic_doc(parser: _Parser) -> str:
    return parser.format_help()


LORA_PARSER = build_parser(
    AdapterSpec, "%%lora",
    "Set how every later training cell updates the weights: LoRA, DoRA, QLoRA (quantize: 4bit) or full.\n"
    "Prints the trainable parameters, their share, and the memory the base weights take.\n\n"
    "  %%lora\n  r: 16\n  alpha: 32\n  target_modules: all-linear   # or [q_proj, v_proj]",
    extra=False,
)
LORA_PARSER.add_argument("--model", dest="_model", default=None,
                         help="model to report the cost on (default: smollm2-135m)")
SFT_PARSER = build_parser(
    SFTSpec, "%%sft",
    "Supervised fine-tuning on demonstrations: `messages`, `prompt`+`completion`, or Alpaca columns.\n"
    "Uses the session's %%lora setting. Returns a Run (shown as a summary).\n\n"
    "  %%sft --data chats --out runs/json-sft -o run\n  epochs: 3\n  learning_rate: 2.0e-4",
)
DPO_PARSER = build_parser(
    DPOSpec, "%%dpo",
    "Direct preference optimisation from pairs: `prompt`, `chosen`, `rejected` (text or messages).\n"
    "With an adapter the reference is the model with the adapter switched off. Loss types: DPO's family,\n"
    "weighted mixtures, and the reference-free simpo and orpo. Shows held-out preference accuracy, KL to\n"
    "the reference, answer length and perplexity before, during and after training.\n\n"
    "  %%dpo --model runs/json-sft --data prefs --eval-data heldout --out runs/dpo1\n  beta: 0.1\n  loss: sigmoid",
)
KTO_PARSER = build_parser(
    KTOSpec, "%%kto",
    "KTO from unpaired thumbs: `prompt`, `completion`, `label` (true = thumbs up). Skewed classes are\n"
    "balanced automatically; --unpair accepts preference pairs.\n\n"
    "  %%kto --model runs/json-sft --data thumbs --out runs/kto1",
)
REWARD_PARSER = build_parser(
    RewardSpec, "%%reward_model",
    "Train a reward model (a scalar score head on the base) on pairs: `prompt`, `chosen`, `rejected`.\n"
    "Reports held-out pairwise accuracy; the result scores new answers: rm.score(prompt, response).\n\n"
    "  %%reward_model --data prefs --eval-data heldout --out runs/rm1 -o rm",
)
RLHF_PARSER = build_parser(
    RLHFSpec, "%%rlhf",
    "Online RL (GRPO or RLOO): the model answers the prompts in --data, --reward scores the answers (a\n"
    "%%reward_model run folder, or Python functions `f(prompts, completions, **kw) -> list[float]` named\n"
    "in the notebook), and the policy moves to higher reward with a KL penalty to the reference.\n\n"
    "  %%rlhf --model runs/json-sft --data prompts --reward runs/rm1 --out runs/rl1",
)
MERGE_PARSER = build_parser(
    MergeSpec, "%%merge",
    "Merge finished runs into a new run, without training. Adapters of one base are combined by peft (cat,\n"
    "the default, adds their updates exactly; svd, ties, dare_ties, dare_linear, magnitude_prune, linear);\n"
    "whole models (full fine-tunes, model folders, or slerp) by mergekit (`pip install 'nbalign[merge]'`).\n"
    "The result is a run folder: use it as --model, or run.generate(...).\n\n"
    "  %%merge --out runs/json-and-safe -o merged\n  runs: [runs/json-sft, runs/refuse-sft]\n  method: ties\n"
    "  weights: [0.6, 0.4]\n  density: 0.5",
    extra=False,
)
NBALIGN_USAGE = """%nbalign runs [ROOT]   list past runs (default ROOT: runs)
%nbalign lora          show the session's adapter setting
%nbalign reset         back to the default adapter; free the model kept for generation
%nbalign help          this help; `%%sft --help`, `%%dpo --help`, ... for each magic"""


@magics_class
class NbalignMagics(Magics):
    def _resolve_names(self, values: dict) -> dict:
        ns = self.shell.user_ns if self.shell is not None else {}
        def lookup(value):
            if isinstance(value, str) and value.isidentifier() and value in ns:
                return ns[value]
            return value

        for key in NAMESPACE_FIELDS:
            value = values.get(key)
            if key == "reward" and isinstance(value, str) and "," in value:
                value = [v.strip() for v in value.split(",") if v.strip()]
            values[key] = [lookup(v) for v in value] if key == "reward" and isinstance(value, list) else lookup(value)
        return {k: v for k, v in values.items() if v is not None or k not in NAMESPACE_FIELDS}

    @staticmethod
    def _check_var(var: str | None) -> None:
        """-o names a notebook variable: checked before anything runs, so a run is never lost to a typo."""
        if var and (not var.isidentifier() or keyword.iskeyword(var)):
            raise NbalignError(f"-o: '{var}' is not a valid Python variable name.", "use e.g. -o run.")

    def _store(self, var: str | None, result) -> None:
        if var:
            self.shell.user_ns[var] = result

    # Line-and-cell magics: `%lora --r 8` and `%sft --help` work on one line, `%%` takes a YAML body.
    @line_cell_magic
    def lora(self, line, cell=None):
        from . import api

        try:
            values, var = parse_cell(LORA_PARSER, line, cell)
            self._check_var(var)
            model = values.pop("_model", None)
            spec = AdapterSpec.from_dict(values)
            report = api.lora(**spec.to_dict(), **({"model": model} if model else {}))
        except _HelpShown:
            return None
        print(report)
        self._store(var, report)
        return None

    def _train(self, parser, function, line, cell):
        try:
            values, var = parse_cell(parser, line, cell)
        except _HelpShown:
            return None
        self._check_var(var)
        result = function(**self._resolve_names(values))
        self._store(var, result)
        return result

    @line_cell_magic
    def sft(self, line, cell=None):
        from . import api

        return self._train(SFT_PARSER, api.sft, line, cell)

    @line_cell_magic
    def dpo(self, line, cell=None):
        from . import api

        return self._train(DPO_PARSER, api.dpo, line, cell)

    @line_cell_magic
    def kto(self, line, cell=None):
        from . import api

        return self._train(KTO_PARSER, api.kto, line, cell)

    @line_cell_magic
    def reward_model(self, line, cell=None):
        from . import api

        return self._train(REWARD_PARSER, api.reward_model, line, cell)

    @line_cell_magic
    def rlhf(self, line, cell=None):
        from . import api

        return self._train(RLHF_PARSER, api.rlhf, line, cell)

    @line_cell_magic
    def merge(self, line, cell=None):
        from . import api

        return self._train(MERGE_PARSER, api.merge, line, cell)

    @line_magic
    def nbalign(self, line):
        from . import api
        from ._session import session

        words = shlex.split(line or "")
        command = words[0] if words else "help"
        if command == "runs":
            return api.list_runs(words[1] if len(words) > 1 else "runs")
        if command == "lora":
            print(f"nbalign: {session.adapter.describe()}")
            return None
        if command == "reset":
            session.reset()
            print(f"nbalign: back to {session.adapter.describe()}; no model kept in memory.")
            return None
        if command in ("help", "-h", "--help"):
            print(NBALIGN_USAGE)
            return None
        raise unknown_option(command, ["runs", "lora", "reset", "help"], "%nbalign")


# `%%sft?` shows the same text as `%%sft --help`.
NbalignMagics.lora.__doc__ = _magic_doc(LORA_PARSER)
NbalignMagics.sft.__doc__ = _magic_doc(SFT_PARSER)
NbalignMagics.dpo.__doc__ = _magic_doc(DPO_PARSER)
NbalignMagics.kto.__doc__ = _magic_doc(KTO_PARSER)
NbalignMagics.reward_model.__doc__ = _magic_doc(REWARD_PARSER)
NbalignMagics.rlhf.__doc__ = _magic_doc(RLHF_PARSER)
NbalignMagics.merge.__doc__ = _magic_doc(MERGE_PARSER)
NbalignMagics.nbalign.__doc__ = NBALIGN_USAGE


def load_ipython_extension(ipython) -> None:
    ipython.register_magics(NbalignMagics)
