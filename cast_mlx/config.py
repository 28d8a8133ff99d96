"""Recipes: typed dataclasses, loaded from YAML, validated before any model loads.

A recipe is a YAML file whose top-level sections match the dataclasses below. Every field
has a default, so a recipe only says what differs. Command-line overrides use dotted paths:
`--set algorithm.name=grpo --set sampling.group_size=4` (values are parsed as YAML scalars).

Validation is driven by the type annotations (`Literal[...]` lists the allowed values) and
by `bounds(...)` metadata on numeric fields. Any problem raises `ConfigError` with one line
that names the field, e.g. `sampling.temperature: must be > 0, got -1.0`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import string
import threading
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional, Union

import yaml

from cast_mlx.algorithm.facts import ALGORITHMS, RENAMED_CONTEXTS, SCALE_REWARDS, TEACHER_CONTEXTS, facts_of
from cast_mlx.errors import ConfigError
from cast_mlx.schema import (
    YAMLProblem,
    bounds,
    build,
    parse_yaml,
    read_yaml,
    set_path,
    show,
)

# The sampler's filter orders (`engine/sampler.py`), named here because this module must not
# load MLX; `rollout` checks its own parameters against them too.
FILTER_ORDERS = ("joint", "sequential")

# The choices that `algorithm.facts` owns (the declared algorithms, and the two fields whose
# default is the algorithm's) and the filter orders above. The schema checks a value against
# these Literals at run time; mypy sees plain strings (a Literal cannot be built from a table
# for it).
if typing.TYPE_CHECKING:
    AlgorithmName = str
    ScaleRewards = str
    TeacherContext = str
    MicroBatch = int  # a run's recipe holds the int: trainer.setup replaces `auto` by the plan's pick
    FilterOrder = str
else:
    AlgorithmName = Literal[tuple(sorted(ALGORITHMS))]
    ScaleRewards = Literal[SCALE_REWARDS]
    TeacherContext = Literal[TEACHER_CONTEXTS]
    MicroBatch = Union[int, Literal["auto"]]
    FilterOrder = Literal[FILTER_ORDERS]


# --------------------------------------------------------------------------- sections


@dataclass
class ModelConfig:
    name: str = "smollm2-135m-instruct"  # embedded name, local mlx-lm folder, or hub id
    # auto: float32 on the CPU backend (quantized matmuls are ~10x slower there),
    # quantized (QLoRA) on Metal/CUDA.
    dtype: Literal["auto", "float32", "bfloat16", "float16", "quantized"] = "auto"
    # An mlx-lm LoRA adapter folder (adapter_config.json + adapters.safetensors, e.g. from
    # `mlx_lm.lora --train`): the starting point of the policy and of the teacher snapshot.
    adapter_path: Optional[str] = None


@dataclass
class DataConfig:
    task: Literal["arithmetic", "gsm8k", "math", "custom"] = "arithmetic"
    # gsm8k/math: a local jsonl file/folder; None = the hub. custom: a .jsonl/.json/.parquet
    # file, a folder of split files, or a folder written by `datasets.save_to_disk`.
    path: Optional[str] = None
    # custom only: a Hugging Face dataset id (datasets.load_dataset), instead of `path`
    hub_id: Optional[str] = None
    hub_config: Optional[str] = None
    train_split: str = "train"  # custom: the split names
    eval_split: str = "test"
    # custom: the column holding the question (a string, or a chat `messages`/`prompt` list
    # as TRL's conversational format has it), the gold answer, and an optional worked solution
    question_field: str = "question"
    answer_field: str = "answer"
    solution_field: Optional[str] = None
    level: int = bounds(1, ge=1, le=6)  # arithmetic difficulty (see data.py)
    train_size: Optional[int] = bounds(None, ge=1)  # None: whole split (arithmetic: 10000)
    eval_size: int = bounds(200, ge=1)
    system_prompt: Optional[str] = None  # None: the model's chat-template default
    answer_format: Literal["hash", "boxed", "none"] = "hash"  # none: free-form, judged by reward.functions
    reward: Literal["strict", "lenient"] = "lenient"
    shuffle: bool = True


@dataclass
class RewardConfig:
    # Empty: the built-in math verifier at data.reward's strictness (0/1). Otherwise a list
    # of `name` (built-ins: math, math_strict, math_lenient, format, overlong, math_verify),
    # `module:function` or `path/to/file.py:function` entries; the reward is their weighted sum.
    functions: list[str] = field(default_factory=list)
    weights: Optional[list[float]] = None  # one per function; None: all 1
    correct_threshold: float = 0.5  # a completion is correct when its reward is >= this
    timeout: float = bounds(10.0, gt=0.0)  # seconds one plug-in call may take (in a worker)
    overlong_buffer: int = bounds(16, ge=1)  # DAPO's soft overlong penalty: the last N tokens


@dataclass
class SamplingConfig:
    prompts_per_step: int = bounds(2, ge=1)
    group_size: int = bounds(8, ge=2)
    temperature: float = bounds(1.0, gt=0.0)
    top_p: float = bounds(1.0, gt=0.0, le=1.0)
    top_k: int = bounds(0, ge=0)  # 0: off
    min_p: float = bounds(0.0, ge=0.0, lt=1.0)
    # joint: each filter on the full distribution (mlx-lm). sequential: top-p on what top-k
    # kept, renormalised (Hugging Face transformers, TRL, vLLM): fewer tokens where top-k holds < top_p
    filter_order: FilterOrder = "joint"
    max_new_tokens: int = bounds(256, ge=1)
    max_batch: int = bounds(64, ge=1)  # decode streams per wave
    # DAPO's dynamic sampling (verl filter_groups, OpenRLHF --dynamic_filtering): draw further
    # prompts until prompts_per_step groups have a reward spread, at most max_rounds rounds
    dynamic: bool = False
    max_rounds: int = bounds(3, ge=1)  # sampling rounds per step with dynamic (the first included)


@dataclass
class AlgorithmConfig:
    # The algorithm (`algorithm/facts.py` says what each one does).
    name: AlgorithmName = "grpo"
    # None in a file: the algorithm's default (`algorithm.facts`); load_recipe fills it in.
    scale_rewards: Optional[ScaleRewards] = None
    eps: float = bounds(1e-4, ge=0.0)  # added to the reward std before dividing by it
    # sample: Bessel's std + eps. population: ddof 0, floored at 1e-6 (the authors' veRL port)
    reward_std: Literal["sample", "population"] = "sample"
    zero_var_base: float = bounds(1.0, ge=0.0)
    cast_lambda: float = bounds(1.0, ge=0.0)
    lambda_schedule: Literal["constant", "linear_decay"] = "constant"
    lambda_decay_steps: int = bounds(300, ge=1)
    correct_box: tuple[float, float] = (0.8, 1.05)
    wrong_box: tuple[float, float] = (0.95, 1.2)
    a_max: float = bounds(1.2, gt=0.0)
    flip: Literal["both", "down", "none"] = "both"
    flip_deadband: float = bounds(0.0, ge=0.0)
    rlsd_eps_w: float = bounds(0.2, ge=0.0, lt=1.0)
    rlsd_lambda_start: float = bounds(0.5, ge=0.0, le=1.0)
    rlsd_lambda_steps: int = bounds(50, ge=1)
    # Spec 4b. teacher: the teacher's gap sets the sign of every token (the paper). verifier:
    # EOS and other special/template tokens get the GRPO advantage of their row instead.
    special_tokens: Literal["teacher", "verifier"] = "teacher"
    gap_centering: bool = False  # g - mean(g over the row's content tokens), before the token rule
    # cast-verl only: g = 0 where the probability ratio e^g lies in [low, high]; [1, 1]: off
    ratio_band: tuple[float, float] = (1.0, 1.0)


@dataclass
class LossConfig:
    eps_low: float = bounds(0.2, ge=0.0, lt=1.0)
    eps_high: float = bounds(0.28, ge=0.0)
    loss_agg: Literal["seq-mean-token-mean", "token-mean", "seq-mean-token-sum-norm"] = "seq-mean-token-mean"
    mask_truncated: bool = True
    beta: float = bounds(0.0, ge=0.0)  # k3 KL to the base model
    # clipped updates per sampled batch (TRL num_iterations, verl ppo_epochs); the teacher's
    # gaps and the advantages are computed once, the behaviour log-probs in the first update
    num_iterations: int = bounds(1, ge=1)
    # the importance ratio per token, or per completion, length-normalised (GSPO: TRL
    # importance_sampling_level, verl loss_mode gspo)
    importance_level: Literal["token", "sequence"] = "token"


@dataclass
class TeacherConfig:
    kind: Literal["snapshot", "base", "ema"] = "snapshot"
    refresh: int = bounds(10, ge=1)  # optimizer steps between snapshots
    ema_decay: float = bounds(0.99, gt=0.0, lt=1.0)
    # None in a file: the algorithm's default (`algorithm.facts`); load_recipe fills it in.
    context: Optional[TeacherContext] = None
    # A diagnostic switch, not CAST: lets an answer-free rule (cast, cast-verl) read the gold
    # answer (context: privileged), an upper bound on what a teacher signal can do through the
    # rule; the run header, every metrics line and the report say "oracle: not CAST".
    oracle: bool = False


@dataclass
class LoraConfig:
    rank: int = bounds(8, ge=1)
    alpha: float = bounds(16.0, gt=0.0)  # scale = alpha / rank
    dropout: float = bounds(0.0, ge=0.0, lt=1.0)
    num_layers: int = bounds(-1, ge=-1)  # last N transformer blocks; -1: all
    keys: list[str] = field(
        default_factory=lambda: [
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.o_proj",
            "mlp.gate_proj",
            "mlp.up_proj",
            "mlp.down_proj",
        ]
    )


@dataclass
class OptimizerConfig:
    lr: float = bounds(5e-5, gt=0.0, le=1.0)
    weight_decay: float = bounds(0.0, ge=0.0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = bounds(1e-8, gt=0.0)
    max_grad_norm: float = bounds(1.0, gt=0.0)
    # completions per forward/backward; auto: the largest that the memory plan fits in the
    # memory budget (training/memory_plan.py), said in the run's header
    micro_batch_size: MicroBatch = bounds(8, ge=1)


@dataclass
class ScheduleConfig:
    steps: int = bounds(100, ge=1)
    warmup_ratio: float = bounds(0.05, ge=0.0, lt=1.0)
    decay: Literal["constant", "linear", "cosine", "polynomial"] = "constant"
    min_lr_ratio: float = bounds(0.0, ge=0.0, le=1.0)


@dataclass
class LoggingConfig:
    out_dir: str = "runs/{name}"  # {name}: the recipe name
    dashboard: bool = True  # rich live view on a TTY; plain lines otherwise
    samples_per_step: int = bounds(2, ge=0)
    eval_every: int = bounds(0, ge=0)  # 0: off
    wandb: bool = False
    tensorboard: bool = False
    trackio: bool = False  # a local trackio run (TRACKIO_DIR, default $HF_HOME/trackio); never the network


@dataclass
class CheckpointConfig:
    every: int = bounds(10, ge=1)
    keep: int = bounds(2, ge=1)


@dataclass
class SystemConfig:
    # GB; MLX takes the limits as 64-bit byte counts, so 2**20 GB (1 PiB) is the ceiling here.
    # A memory limit below the model's weight files is refused before loading; MLX's limit is
    # soft on the CPU, so the first step whose peak went over it gets a warning.
    memory_limit_gb: Optional[float] = bounds(None, gt=0.0, le=2.0**20)
    cache_limit_gb: Optional[float] = bounds(None, ge=0.0, le=2.0**20)
    max_bad_steps: int = bounds(3, ge=1)  # consecutive NaN/inf steps before stopping
    # Seconds one collective waits for the other ranks; the watchdog's threading.Timer dies on
    # more than threading.TIMEOUT_MAX (the run would then wait forever).
    dist_timeout: float = bounds(900.0, gt=0.0, le=float(int(threading.TIMEOUT_MAX)))
    # The length-drift guard (metrics.length_drift): the mean truncation rate of the last
    # `drift_window` steps is `drift_rise` above its lowest such mean so far while the reward
    # did not rise. Fitted on the committed runs (scripts/fit_drift_guard.py, docs/training.md).
    drift_window: int = bounds(3, ge=1)
    drift_rise: float = bounds(0.2, gt=0.0, le=1.0)
    stop_on_drift: bool = False  # write a checkpoint and stop (exit code 4) when it fires
    # Score a group's completions after one pass of their shared context (prompt or teacher
    # context) instead of one per row: same log-probs and gradients to float rounding, fewer
    # positions to compute (logprobs.py). false: one full forward per row.
    share_prefix: bool = True
    # With LoRA on the top blocks only, the rollout keeps the states entering the first
    # adapted block and the update (and a `same`-context teacher, the KL reference) runs only
    # the blocks above: same log-probs and gradients to float rounding (logprobs.py).
    # false: every scoring pass runs the whole model.
    reuse_frozen: bool = True


@dataclass
class Recipe:
    name: str = "run"  # the run's folder name in logging.out_dir
    # mx.random.key takes 0..2**64-1, numpy's legacy seeding 0..2**32-1: the range all accept
    seed: int = bounds(0, ge=0, lt=2**32)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    system: SystemConfig = field(default_factory=SystemConfig)


def _check_recipe(r: Recipe) -> None:
    """Constraints between fields."""
    for name in ("correct_box", "wrong_box"):
        lo, hi = getattr(r.algorithm, name)
        if not 0 < lo <= 1 <= hi:
            raise ConfigError(f"algorithm.{name}: need 0 < low <= 1 <= high, got [{lo}, {hi}]")
    lo, hi = r.algorithm.ratio_band
    if not 0 < lo <= 1 <= hi:
        raise ConfigError(f"algorithm.ratio_band: need 0 < low <= 1 <= high, got [{lo}, {hi}]")
    _check_teacher_context(r.algorithm.name, r.teacher.context, r.teacher.oracle)
    _check_dynamic(r)
    b1, b2 = r.optimizer.betas
    if not (0 <= b1 < 1 and 0 <= b2 < 1):
        raise ConfigError(f"optimizer.betas: each must be in [0, 1), got [{b1}, {b2}]")
    if not r.lora.keys:
        raise ConfigError("lora.keys: at least one layer name is needed")
    if not r.model.name.strip():
        raise ConfigError("model.name: must not be empty")
    _check_name(r.name)
    _check_out_dir(r.logging.out_dir)
    _check_data_path(r.data, r.logging.eval_every)
    if r.data.answer_format == "none":  # free-form answers: only reward functions can judge them
        if not r.reward.functions:
            raise ConfigError("data.answer_format: 'none' needs reward.functions to judge the answers")
        if r.logging.eval_every:
            raise ConfigError(
                "logging.eval_every: in-training eval scores hash/boxed answers; set it to 0 for answer_format none"
            )
    if r.data.task == "custom" and (r.data.path is None) == (r.data.hub_id is None):
        raise ConfigError("data.path, data.hub_id: a custom task needs exactly one of them")
    if r.data.task != "custom" and r.data.hub_id is not None:
        raise ConfigError("data.hub_id: only for data.task custom (gsm8k/math read the hub when data.path is null)")
    if not math.isfinite(r.reward.correct_threshold):
        raise ConfigError("reward.correct_threshold: must be a finite number")


def _check_dynamic(r: Recipe) -> None:
    """Dynamic sampling drops the groups whose rewards are all equal; an estimator that gives
    them `±zero_var_base` learns from those groups, so the two would contradict each other."""
    a = r.algorithm
    if r.sampling.dynamic and facts_of(a.name).zero_var_base and a.zero_var_base > 0:
        raise ConfigError(
            f"sampling.dynamic: {a.name} learns from all-correct/all-wrong groups (algorithm.zero_var_base="
            f"{a.zero_var_base:g}), which dynamic sampling drops; set algorithm.zero_var_base=0 "
            "or sampling.dynamic=false"
        )


def _check_teacher_context(algorithm: str, context: str | None, oracle: bool = False) -> None:
    """An answer-free algorithm's teacher must not see the gold answer (`privileged`), unless
    the run is declared an oracle; an oracle is exactly that case."""
    facts = facts_of(algorithm)
    answer_free_rule = facts.uses_teacher and facts.answer_free
    if oracle and not (answer_free_rule and context == "privileged"):
        raise ConfigError(
            "teacher.oracle: only for an answer-free algorithm (cast, cast-verl) with teacher.context=privileged"
        )
    if answer_free_rule and context == "privileged" and not oracle:
        *first, last = (c for c in TEACHER_CONTEXTS if c != "privileged")
        use = f"{', '.join(first)} or {last}"
        others = sorted(n for n, f in ALGORITHMS.items() if f.uses_teacher and not f.answer_free)
        if others:
            use += ", or algorithm.name=" + " or ".join(others)
        raise ConfigError(
            f"teacher.context: 'privileged' shows the gold answer; {algorithm}'s teacher is answer-free "
            f"(use {use}; teacher.oracle=true runs it as a labelled oracle, not CAST)"
        )


def _check_name(name: str) -> None:
    """`name` becomes one folder (logging.out_dir's `{name}`): it must not climb out of it,
    split into several, or hold characters that a terminal or a file system mangles."""
    if not name.strip():
        raise ConfigError(f"name: must not be empty, got {show(name)}")
    if name in (".", "..") or "/" in name or "\\" in name or not name.isprintable():
        raise ConfigError(
            f"name: must be a plain folder name (no '/', '\\', '.', '..' or control characters), got {show(name)}"
        )
    if len(name.encode()) > 255:  # the longest file name most file systems allow
        raise ConfigError(f"name: at most 255 bytes, got {len(name.encode())}")


def _check_out_dir(template: str) -> None:
    """`logging.out_dir` is formatted with `name` only (see `out_dir`); anything else in braces
    would fail (KeyError, IndexError) when the run starts."""
    where = "logging.out_dir"
    if not template.strip():
        raise ConfigError(f"{where}: must not be empty (default: runs/{{name}})")
    if not template.isprintable():
        raise ConfigError(f"{where}: holds control characters, got {show(template)}")
    try:
        fields = [(f, conv, spec) for _, f, spec, conv in string.Formatter().parse(template) if f is not None]
    except ValueError as exc:  # a lone '{' or '}'
        raise ConfigError(f"{where}: {exc} in {show(template)}; write {{{{ and }}}} for literal braces") from None
    for f, conv, spec in fields:
        if (f, conv, spec) != ("name", None, ""):
            shown = "{" + f + (f"!{conv}" if conv else "") + (f":{spec}" if spec else "") + "}"
            raise ConfigError(f"{where}: unknown placeholder {shown}; the only one is {{name}}")


def _check_data_path(d: DataConfig, eval_every: int) -> None:
    if d.path is None:
        return
    if d.task == "arithmetic":
        raise ConfigError("data.path: the arithmetic task is generated and reads no file; remove data.path")
    if not d.path.strip():
        raise ConfigError("data.path: must not be empty (null: the task's hub dataset)")
    # data.load_task reads `{split}.jsonl` from a folder but a single file for every split, so
    # in-training eval on a file would score the training problems as if they were held out.
    if eval_every > 0 and Path(d.path).is_file():
        raise ConfigError(
            f"data.path: {d.path} is a single file, so logging.eval_every would evaluate on the training "
            "problems; give a folder with train.jsonl and test.jsonl, or set logging.eval_every: 0"
        )


# Fields that were removed, and why; `false`/absent loads as before (run folders of older
# versions hold them), anything else is refused in one line.
RETIRED = {
    ("system", "compiled_decode"): "the compiled static-shape decode step was removed: it ran at 0.83x the "
    "engine's tok/s on the CPU and gave other ids on CUDA (docs/speed.md); delete the line",
}


def _retired_fields(data: dict) -> dict:
    data = dict(data)
    for (section, name), why in RETIRED.items():
        part = data.get(section)
        if isinstance(part, dict) and name in part:
            if part[name] not in (False, None):
                raise ConfigError(f"{section}.{name}: {why}")
            data[section] = {k: v for k, v in part.items() if k != name}
    return data


def _renamed_contexts(data: dict) -> dict:
    """Renamed teacher contexts given their new names, so that older recipes and run folders
    still load."""
    data = dict(data)
    teacher = data.get("teacher")
    if isinstance(teacher, dict) and isinstance(teacher.get("context"), str):
        context = teacher["context"]
        data["teacher"] = {**teacher, "context": RENAMED_CONTEXTS.get(context, context)}
    return data


def _fill_defaults(r: Recipe) -> None:
    """Replace the None fields that mean "the algorithm's default" by concrete values."""
    facts = facts_of(r.algorithm.name)
    if r.algorithm.scale_rewards is None:
        r.algorithm.scale_rewards = facts.scale_rewards
    if r.teacher.context is None:
        r.teacher.context = facts.teacher_context


def from_dict(data: dict) -> Recipe:
    """A validated recipe with every derived default resolved (no field means "default")."""
    recipe = build(Recipe, _renamed_contexts(_retired_fields(data)), "")
    _fill_defaults(recipe)
    _check_recipe(recipe)
    return recipe


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `a.b=value` strings (value parsed as a YAML scalar/list) to a raw recipe dict."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item}: expected key=value")
        key, raw = item.split("=", 1)
        try:
            value = parse_yaml(raw) if raw.strip() else ""
        except YAMLProblem as exc:
            raise ConfigError(f"--set {item}: value is not valid YAML ({exc.problem})") from exc
        set_path(Recipe, data, key.strip(), value)
    return data


def load_recipe(path: str | Path | None, overrides: Sequence[str] = ()) -> Recipe:
    """Read a recipe file (or start from defaults with `path=None`) and apply `--set`s."""
    data = read_yaml(path) if path is not None else {}
    return from_dict(apply_overrides(data, list(overrides)))


def to_dict(recipe: Recipe) -> dict:
    def plain(v):
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        if isinstance(v, list):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(dataclasses.asdict(recipe))


def to_yaml(recipe: Recipe) -> str:
    return yaml.safe_dump(to_dict(recipe), sort_keys=False)


def recipe_hash(recipe: Recipe) -> str:
    """Stable short hash of the resolved recipe (stored in checkpoints)."""
    blob = json.dumps(to_dict(recipe), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


# The recipe the README runs; tools that need "the default settings" read it.
DEFAULT_RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "smollm2-135m-arith.yaml"
ORACLE_LABEL = "oracle: not CAST"  # what an oracle run (teacher.oracle) is called wherever it shows


def run_label(recipe: Recipe) -> str | None:
    """What a run must be called besides its algorithm: an oracle's label, else None."""
    return f"{ORACLE_LABEL} (its teacher sees the gold answer)" if recipe.teacher.oracle else None


def out_dir(recipe: Recipe) -> Path:
    return Path(recipe.logging.out_dir.format(name=recipe.name))
