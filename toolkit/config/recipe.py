"""The recipe: one small typed schema, loaded from YAML, with `--set a.b=value` overrides.

Every section forbids unknown keys, so a typo is an error that names its key path and the valid keys instead of a
setting that is silently ignored. All problems are collected and reported together.
"""

from __future__ import annotations

import difflib
import re
import reprlib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from toolkit.data import formatters
from toolkit.data.formatters import FORMATTERS
from toolkit.errors import ToolkitError, first_line

RECIPE_FILE = "recipe.yaml"  # the resolved recipe inside a run directory

Precision = Literal["auto", "bf16", "fp16", "fp32"]
MAX_COUNT = 100_000_000  # steps and intervals beyond this are typos, not plans


class Section(BaseModel):
    # allow_inf_nan=False: `.inf` and `.nan` are valid YAML floats but no setting can work with them.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class ModelSection(Section):
    name: str = Field(description="Hub id, local directory, or builtin:tiny-mllama.")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit).")
    dtype: Precision = Field("auto", description="dtype of the frozen base weights; auto follows train.precision.")
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2", "flex_attention", "varlen"] = Field(
        "auto", description="Attention kernel; flex_attention: text rows only (with train.padding_free it skips the "
        "pairs of different rows instead of computing and masking them); varlen: PyTorch's variable-length "
        "FlashAttention, for padding-free training in bf16/fp16 on a GPU of compute capability 8.0+ (eval, generate "
        "and merge use sdpa); auto: varlen to train padding-free where it runs, else flex_attention on a GPU, and "
        "sdpa everywhere else.")


class QuantizationSection(Section):
    mode: Literal["none", "8bit", "4bit"] = Field("none", description="bitsandbytes quantization of the base model.")
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type.")
    double_quant: bool = Field(True, description="4-bit: quantize the quantization constants too (saves ~0.4 bit/param).")
    compute_dtype: Precision = Field("auto", description="4-bit matmul dtype; auto follows train.precision.")
    int8_threshold: float = Field(6.0, ge=0, description="8-bit: outlier threshold (LLM.int8()).")
    int8_matmul: Literal["dequantize", "int8"] = Field(
        "dequantize", description="8-bit: dequantize each weight to the compute dtype for a plain matmul (fast, keeps "
        "no inputs), or bitsandbytes' LLM.int8() matmul (int8_threshold applies only to that).")
    skip_modules: list[str] | None = Field(
        None, description="Modules left unquantized. Unset: transformers keeps lm_head unquantized; a list replaces "
        "that default, so name lm_head in it to keep it so."
    )


class LoraSection(Section):
    r: int = Field(8, gt=0, le=4096, description="LoRA rank.")
    alpha: float = Field(16, gt=0, le=1e6, description="LoRA scaling numerator (scale = alpha / r).")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA input.")
    targets: list[str] | str = Field(
        ["q_proj", "k_proj", "v_proj", "o_proj"],
        description="Module names (a list) or one regex over full module paths (a string).",
    )
    scope: Literal["language", "vision", "all"] = Field(
        "language", description="Which tower a list of targets may touch; a regex may not reach past it either."
    )
    bias: Literal["none", "all", "lora_only"] = Field("none", description="Which biases train.")
    upcast_inputs: bool = Field(
        False, description="Feed LoRA fp32 copies of its inputs (PEFT's default; slower, more memory under bf16)."
    )

    @field_validator("targets")
    @classmethod
    def _targets_compile(cls, value):
        if isinstance(value, str):
            try:
                re.compile(value)
            except re.error as err:
                raise ValueError(f"not a valid regular expression ({err})") from None
        elif not value or not all(name.strip() for name in value):
            raise ValueError("give at least one module name, none empty")
        return value


class ReplaySection(Section):
    share: float = Field(0.0, ge=0, le=0.9, description="Share of the training rows that are general rows mixed in "
                         "to keep what the model already knew (0: none).")
    data: str | None = Field(None, description="General rows to mix in, read with data.formatter (default: the "
                             "general set the toolkit ships).")

    @field_validator("data")
    @classmethod
    def _a_file(cls, value):
        if value is not None and not value.strip():
            raise ValueError("name a data file, or leave replay.data out for the shipped general set")
        return value


class DataSection(Section):
    train: str | list[str] = Field(description="Training rows: a data file, or a list of files read in order.")
    eval: str | list[str] | None = Field(None, description="Held-out rows: a data file or a list of files.")
    eval_fraction: float = Field(0.0, ge=0, lt=1, description="Hold out this share of train when eval is not given.")
    formatter: str = Field(formatters.DEFAULT, description="How a row becomes a conversation.")
    system_prompt: str | None = Field(None, description="System message for every row (text-only rows: Llama 3.2 "
                                      "Vision's template refuses one beside an image).")
    too_long: Literal["truncate", "drop"] = Field(
        "truncate", description="Rows longer than train.max_seq_length: cut them (a row left with no answer token "
        "is dropped) or drop them; both are counted and reported."
    )
    train_on: Literal["all", "last"] = Field(
        "all", description="Which assistant turns of a multi-turn row the loss covers: every one, or the last."
    )
    glossary: str | None = Field(None, description="Term list (one per line) for eval when rows carry no terms.")
    date_string: str = Field("26 Jul 2024", description="Date the chat template stamps in; pinned so text is stable.")
    image_root: str | None = Field(None, description="Folder that relative image paths start from (default: the "
                                   "folder of the data file naming them).")
    max_image_tiles: int | None = Field(None, ge=1, le=64, description="Cap on tiles per image (default: the "
                                        "model's); fewer tiles means lower resolution.")
    image_workers: int | Literal["auto"] = Field(
        "auto", description="DataLoader worker processes that open images and build image batches beside each "
        "training process; auto: from the CPU count (up to 8 each), 0: in the training process.")
    num_proc: int | None = Field(None, ge=1, le=256, description="Processes that check and encode rows (default: "
                                 "the usable CPUs); the ids are the same for any number.")
    vision_tiles: Literal["padded", "filled"] = Field(
        "padded", description="padded: every image runs as the model's tile count (4), as transformers and serving "
        "engines run it; filled: only the tiles the batch's images fill (a 1-tile drawing costs about a quarter), "
        "with the padded tiles hidden from the vision attention, which changes the image features slightly "
        "(README: Images).")
    replay: ReplaySection = Field(ReplaySection(), description="General rows mixed into training (see "
                                  "toolkit.data.replay).")

    @field_validator("image_workers", mode="before")
    @classmethod
    def _workers_or_auto(cls, value):
        if value != "auto" and (isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 64):
            raise ValueError(f"give a number of worker processes from 0 to 64, or auto (got {value!r})")
        return value

    @field_validator("formatter")
    @classmethod
    def _known_formatter(cls, value: str) -> str:
        if value not in FORMATTERS:
            raise ValueError(f"unknown formatter '{value}'; choose one of: {', '.join(sorted(FORMATTERS))}")
        return value

    @field_validator("train", "eval")
    @classmethod
    def _files_named(cls, value):
        files = [value] if isinstance(value, str) else value
        if files is not None and (not files or not all(name.strip() for name in files)):
            raise ValueError("name at least one data file, none empty")
        return value

    @model_validator(mode="after")
    def _one_eval_source(self) -> "DataSection":
        if self.eval is not None and self.eval_fraction > 0:
            raise ValueError("data.eval and data.eval_fraction cannot be used together; pick one")
        return self


class TrainSection(Section):
    epochs: float = Field(3, gt=0, le=10_000, description="Passes over the training rows (ignored when max_steps is set).")
    max_steps: int | None = Field(None, gt=0, le=MAX_COUNT, description="Stop after this many optimizer steps.")
    batch_size: int | Literal["auto"] = Field(
        2, description="Rows per device per micro-batch; auto: the most that fit train.memory_budget_gib.")
    memory_budget_gib: float = Field(68.0, gt=0, le=100_000, description="GPU memory batch_size: auto may plan "
                                     "for (the default fits an 80 GB card with headroom).")
    grad_accum: int = Field(1, gt=0, le=65_536, description="Micro-batches per optimizer step.")
    learning_rate: float = Field(2e-4, gt=0, le=1, description="Peak learning rate.")
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = Field("linear")
    warmup_ratio: float = Field(0.0, ge=0, lt=1, description="Share of steps spent warming up.")
    weight_decay: float = Field(0.0, ge=0, le=10)
    max_grad_norm: float = Field(1.0, gt=0)
    optim: str = Field("adamw_torch", description="Any optimizer name transformers' Trainer accepts.")
    max_seq_length: int = Field(512, ge=8, le=1_048_576, description="Longest row in tokens (see data.too_long).")
    seed: int = Field(42, ge=0, le=2**32 - 1, description="Seed for init, shuffling and dropout.")
    precision: Precision = Field("auto", description="auto: bf16 where the GPU supports it, fp16 otherwise, fp32 on CPU.")
    gradient_checkpointing: bool | Literal["offload"] = Field(
        False, description="Recompute activations to save memory (slower); offload: also keep each checkpointed "
        "layer's input in host memory, copied while the GPU computes (toolkit.training.activations).")
    checkpoint_layers: int | Literal["all", "auto"] = Field(
        "all", description="With gradient checkpointing: how many self-attention decoder layers are checkpointed "
        "(spread evenly; the others keep their activations and skip the recomputation); auto: the fewest that fit "
        "train.memory_budget_gib.")
    compile: bool = Field(False, description="torch.compile each self-attention decoder layer (one compiled block "
                          "reused across layers, dynamic lengths, cached under the toolkit cache; GPU; not with "
                          "liger_kernel).")
    group_by_length: bool = Field(False, description="Batch rows of similar length together (less padding).")
    padding_free: bool = Field(False, description="Text rows: each micro-batch as one sequence, its rows end to end "
                               "with positions restarting at each row and no padding; each row attends to itself "
                               "only (TRL's padding-free collator). Not for image rows.")
    liger_kernel: bool = Field(False, description="Use Liger's fused kernels (GPU, needs liger-kernel).")
    fused_lora: bool = Field(True, description="Run each LoRA layer as one autograd function that keeps only "
                             "its input (toolkit.model.fastlora); false: PEFT's own layers.")
    fp8_matmuls: Literal["none", "forward", "all"] = Field(
        "none", description="Multiply activations by the frozen base weights in FP8 (e4m3, one scale per row; "
        "toolkit.model.fp8) inside the self-attention decoder layers: forward: the forward pass and its "
        "recomputation; all: the input gradients of backward too. Faster, slightly less exact; adapters, attention "
        "and the LM head stay in train.precision. bf16 on a GPU of compute capability 8.9+ (H100, L40S, ...).")
    token_metrics: bool = Field(False, description="Log TRL's per-step entropy and token accuracy (costs a "
                                "device sync per micro-batch).")
    logging_steps: int = Field(10, gt=0, le=MAX_COUNT)
    save_steps: int = Field(200, gt=0, le=MAX_COUNT, description="Checkpoint every this many steps.")
    save_total_limit: int | None = Field(2, gt=0, le=MAX_COUNT, description="Keep at most this many checkpoints.")
    eval_steps: int | None = Field(None, gt=0, le=MAX_COUNT,
                                   description="Evaluate loss on the eval rows every this many steps.")
    report_to: str | list[str] = Field("none", description="Experiment trackers the Trainer reports to (one name "
                                       "or a list: tensorboard, wandb, mlflow, trackio, ...); none: only the run "
                                       "directory's metrics.json.")
    sample_every: int | None = Field(None, gt=0, le=MAX_COUNT, description="Every this many steps, answer the "
                                     "first sample_rows eval rows greedily and log their term accuracy.")
    sample_rows: int = Field(4, gt=0, le=1000, description="Eval rows answered at each sample_every step.")

    @field_validator("report_to")
    @classmethod
    def _known_trackers(cls, value):
        from toolkit.training.trackers import schema_problem

        problem = schema_problem(value)
        if problem:
            raise ValueError(problem)
        return value

    @field_validator("batch_size", mode="before")
    @classmethod
    def _rows_or_auto(cls, value):
        if value != "auto" and (isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= 65_536):
            raise ValueError(f"give a number of rows from 1 to 65536, or auto (got {value!r})")
        return value

    @field_validator("checkpoint_layers", mode="before")
    @classmethod
    def _layer_count(cls, value):
        if value not in ("all", "auto") and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise ValueError(f"give a number of layers (0 or more), all or auto (got {value!r})")
        return value

    @model_validator(mode="after")
    def _layers_need_checkpointing(self) -> "TrainSection":
        if self.checkpoint_layers != "all" and not self.gradient_checkpointing:
            raise ValueError(f"checkpoint_layers={self.checkpoint_layers} needs gradient_checkpointing: true or "
                             "offload")
        return self

    @model_validator(mode="after")
    def _compile_without_liger(self) -> TrainSection:
        # Measured on an H100 (torch 2.11, liger-kernel 0.8.5): Dynamo fails inside the layers Liger patched (its
        # RMSNorm Triton kernel cannot be traced), after the whole model has loaded.
        if self.compile and self.liger_kernel:
            raise ValueError("compile=true cannot trace Liger's kernels in the decoder layers (torch.compile fails "
                             "on them); set liger_kernel: false to compile, or compile: false")
        return self

    @field_validator("optim")
    @classmethod
    def _known_optimizer(cls, value: str) -> str:
        from transformers.training_args import OptimizerNames

        names = [o.value for o in OptimizerNames]
        if value not in names:
            close = difflib.get_close_matches(value, names, n=1, cutoff=0.75)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ValueError(f"unknown optimizer '{value}'{hint}; common ones: adamw_torch, adamw_torch_fused, "
                             "adamw_8bit, paged_adamw_8bit, adafactor, sgd")
        return value


class RetentionSection(Section):
    data: str | None = Field(None, description="General rows for toolkit eval --retention (default: the set the "
                             "toolkit ships); read with data.formatter.")
    max_kl: float = Field(0.25, ge=0, le=1e6, description="Warn when the mean per-token KL(tuned || base) on the "
                          "general reference answers is above this (nats).")
    max_accuracy_drop: float = Field(0.05, ge=0, le=1, description="Warn when general term accuracy falls by more "
                                     "than this (tuned vs base).")

    @field_validator("data")
    @classmethod
    def _a_file(cls, value):
        if value is not None and not value.strip():
            raise ValueError("name a data file, or leave it out for the shipped general set")
        return value


class Recipe(Section):
    model: ModelSection
    quantization: QuantizationSection = QuantizationSection()
    lora: LoraSection = LoraSection()
    data: DataSection
    train: TrainSection = TrainSection()
    retention: RetentionSection = RetentionSection()
    output_dir: str | None = Field(None, description="Run directory; default runs/<recipe file name>.")

    @field_validator("output_dir")
    @classmethod
    def _a_directory(cls, value):
        if value is not None and not value.strip():  # "" would mean the current directory
            raise ValueError("give a directory, or leave output_dir out for runs/<recipe file name>")
        return value


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b=value` -> (["a", "b"], value), the value read as YAML so numbers, booleans and lists keep their type."""
    key, sep, raw = text.partition("=")
    path = key.strip().split(".")
    if not sep or not all(part.strip() for part in path):
        raise ToolkitError(f"--set expects KEY=VALUE with a dotted key (e.g. train.max_steps=5), got {text!r}")
    try:
        value = load_unique(raw) if raw.strip() else ""
    except DuplicateKeys as err:
        raise ToolkitError(f"--set {key.strip()}: in its value, {err}; keep one") from None
    except yaml.YAMLError as err:
        raise ToolkitError(f"--set {key.strip()}: the value is not valid YAML ({yaml_problem(err)}); quote it, "
                           f"e.g. --set '{key.strip()}=\"...\"'") from None
    except RecursionError:
        raise ToolkitError(f"--set {key.strip()}: the value is nested too deeply to be a setting") from None
    return [part.strip() for part in path], value


def check_overrides_once(parsed: list[tuple[list[str], Any]], overrides: list[str]) -> None:
    """Refuse two `--set`s of the same key (or of a key and the section holding it): which one wins would
    otherwise depend on their order on the command line."""
    for later, (path, _) in enumerate(parsed):
        for earlier, (other, _) in enumerate(parsed[:later]):
            shorter = min(len(path), len(other))
            if path[:shorter] == other[:shorter]:
                raise ToolkitError(f"--set {'.'.join(path[:shorter])} is given twice ({overrides[earlier]!r} and "
                                   f"{overrides[later]!r}); keep one")


def apply_overrides(data: Any, overrides: list[str]) -> Any:
    """Set each `--set` key in the recipe's mapping, creating sections as needed."""
    parsed = [parse_override(text) for text in overrides]
    check_overrides_once(parsed, overrides)
    for path, value in parsed:
        if not isinstance(data, dict):
            raise ToolkitError(f"--set {'.'.join(path)}: the recipe is not a mapping of sections, so there is no "
                               "key to set; fix the recipe file first")
        node = data
        for depth, part in enumerate(path[:-1]):
            child = node.get(part)
            if child is None:
                child = {}
                node[part] = child
            elif not isinstance(child, dict):
                where = ".".join(path[: depth + 1])
                raise ToolkitError(f"--set {'.'.join(path)}: {where} is a value ({shown(child)}), not a section")
            node = child
        node[path[-1]] = value
    return data


def _fields_at(loc: tuple) -> list[str]:
    """The valid keys of the section at `loc`, for error messages."""
    model: type[BaseModel] = Recipe
    for part in loc:
        field = model.model_fields.get(str(part))
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return list(model.model_fields)


def _field_path(loc: tuple) -> tuple:
    """Drop the union-member labels pydantic adds (e.g. `list[str]`), keeping key names and list indexes."""
    return tuple(p for p in loc if isinstance(p, int) or not any(c in str(p) for c in "[]") and p != "str")


def shown(value) -> str:
    """A value as an error message quotes it: its repr, cut short (a recipe value can be huge, or hold itself
    through YAML anchors)."""
    short = reprlib.Repr()
    short.maxstring, short.maxother, short.maxlevel = 80, 80, 3
    return short.repr(value)


def describe_error(error: dict) -> str:
    loc = _field_path(error["loc"])
    path = ".".join(str(p) for p in loc) or "(top level)"
    kind = error["type"]
    if kind == "extra_forbidden":
        valid = _fields_at(loc[:-1])
        close = difflib.get_close_matches(str(loc[-1]), valid, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        return f"{path}: unknown key{hint}; valid keys here: {', '.join(valid)}"
    if kind == "missing":
        return f"{path}: required key is missing"
    if kind == "literal_error":
        return f"{path}: {shown(error['input'])} is not allowed; choose one of: {error['ctx']['expected']}"
    message = error["msg"].removeprefix("Value error, ")
    if kind.endswith("_type") or kind.endswith("_parsing"):
        return f"{path}: {message} (got {shown(error['input'])})"
    return f"{path}: {message}"


def _unique(messages: list[str]) -> list[str]:
    return list(dict.fromkeys(messages))


def recipe_from_dict(data: Any, source: str = "recipe") -> Recipe:
    if not isinstance(data, dict):
        raise ToolkitError(f"{source}: expected a mapping of sections (model, data, ...), got {type(data).__name__}")
    try:
        return Recipe.model_validate(data)
    except ValidationError as err:
        # `list[str] | str` reports one error per union member; keep each message once.
        problems = _unique([describe_error(e) for e in err.errors()])
        lines = "\n".join(f"  - {p}" for p in problems)
        raise ToolkitError(f"{source} has {len(problems)} problem(s):\n{lines}") from None


def yaml_problem(err: yaml.YAMLError) -> str:
    """One line: what is wrong and where (PyYAML's own message spans several lines with a caret drawing)."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or first_line(err)
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark else problem


class UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key written twice in one mapping is an error naming both lines (PyYAML
    keeps the last one silently, so `learning_rate` written twice would train at the second value with no word).
    Keys brought in by a `<<` merge may still be overridden, as YAML intends."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            first_seen: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key, line = self.construct_object(key_node, deep=True), key_node.start_mark.line + 1
                try:
                    earlier = first_seen.get(key)
                except TypeError:  # an unhashable key: SafeLoader refuses it on its own below
                    continue
                if earlier is None:
                    first_seen[key] = line
                else:
                    self.duplicates.append((line, f"key '{key}' is written twice (lines {earlier} and {line})"))
        return super().construct_mapping(node, deep=deep)


def load_unique(text: str) -> Any:
    """YAML text as data, refusing duplicated keys (every one of them, in one error)."""
    loader = UniqueKeyLoader(text)
    loader.duplicates = []
    try:
        data = loader.get_single_data()
    finally:
        loader.dispose()
    if loader.duplicates:
        raise DuplicateKeys([problem for _, problem in sorted(loader.duplicates)])
    return data


class DuplicateKeys(Exception):
    def __init__(self, problems: list[str]):
        super().__init__("; ".join(problems))
        self.problems = problems


def read_yaml(path: Path) -> Any:
    if path.is_dir():
        raise ToolkitError(f"recipe {path} is a directory; give the recipe's YAML file")
    if not path.is_file():
        raise ToolkitError(f"recipe not found: {path}")
    try:
        return load_unique(path.read_text(encoding="utf-8")) or {}
    except DuplicateKeys as err:
        raise ToolkitError(f"{path}: {err}; keep one of each") from None
    except yaml.YAMLError as err:
        raise ToolkitError(f"{path}: not valid YAML: {yaml_problem(err)}") from None
    except UnicodeDecodeError:
        raise ToolkitError(f"{path}: not UTF-8 text") from None
    except RecursionError:
        raise ToolkitError(f"{path}: nested too deeply to be a recipe") from None
    except OSError as err:
        raise ToolkitError(f"{path}: cannot be read ({err.strerror})") from None


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    path = Path(path)
    data = apply_overrides(read_yaml(path), overrides or [])
    recipe = recipe_from_dict(data, source=str(path))
    if recipe.output_dir is None:
        recipe = recipe.model_copy(update={"output_dir": str(Path("runs") / path.stem)})
    return recipe


def save_recipe(recipe: Recipe, path: Path) -> None:
    """Write the fully resolved recipe (every default spelled out) so a run can be reproduced from its directory."""
    from toolkit.io.files import write_text_atomic

    text = yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False, allow_unicode=True)
    write_text_atomic(path, text)
