"""The memory plan: a step's peak memory per phase, predicted before the model loads from the
model's config.json (no weights read), the recipe and the longest prompts, so that a run that
cannot fit stops at once, in one line that names the field to change and the value that fits
(`plan_run`, called by `trainer.setup`), and `optimizer.micro_batch_size: auto` is the largest
micro-batch that fits. The run's header shows it (`Plan.line`):

    memory plan: load 0.64 GB, rollout 0.54 GB, teacher 0.52 GB, update 0.55 GB (peak 0.64 GB of 23.5 GB)

The model of memory, in bytes. `b_w`, `b_a`: bytes of a weight and of an activation element (4
in float32; 2 in bfloat16/float16, and for a quantized model, whose activations take its scales'
dtype). LoRA on `k` blocks, rank `r`, over the `keys` linears (`in x out` each); `P x G = N` rows
on this process; `L` = sampling.max_new_tokens; `C` the longest prompt, `C_t` the longest
teacher context; `V`, `H`, `I` the vocabulary, hidden and MLP widths; `kv` heads of `hd`.
`n` rows a pass holds at once: a micro-batch's (at most `G` with system.share_prefix, whose
buckets hold one prompt's rows), or all `N` for the old policy of a `same`-context teacher (the
rows its update skips: at worst all) and the KL reference, which `teacher.model_logprobs`
evaluates over all micro-batches in one go;
`tok` = the positions those rows run (`n L` + one context per bucket; `n (C + L)` unshared).

    weights  W = every parameter x b_w; quantized: bits/8 per linear or embedding weight and a
             2-byte scale and bias per group (config.json's `quantization`), the rest 2 bytes
    load     W, or W_stored + W (1 + LOAD_EXTRA) when models.load converts (a 4-bit checkpoint
             dequantized to float32 on the CPU: both copies live until the load's last eval)
    LoRA     A = k sum_keys r (in + out) 4; resident: R = W + A (3 + snapshot + KL reference/2)
             (the adapters, AdamW's two moments, the teacher's copy: 1 snapshot/ema, 0.5 base)
    states   S = N L H b_a: the frozen blocks' output the rollout keeps for the update
             (system.reuse_frozen with LoRA on the top blocks only; else 0)
    rollout  R + max(merged + KV + S + ROLLOUT_LOGITS B V 4, ROLLOUT_STATES S), B = min(P,
             max_batch // G) G streams a wave, KV = layers 2 B kv hd (C + L) b_a, merged = the
             adapted linears merged with LoRA while sampling, k sum_keys in out b_w (float only)
    teacher  R + S + n V 4 t(L) + tok (t_H H + t_I I) b_a when a teacher or the KL reference is
             scored, else R + S
    update   R + S + 2 A + n V 4 u(L) + tok (k (u_H H + u_I I) + u_T H) b_a

`u(L)` and `t(L)` (`UPDATE_HEAD`, `TEACHER_HEAD`, interpolated between measured token caps) are
the float32 logits, in positions' worth, that the head holds per completion position: not one
64-position chunk (logprobs.py chunks the head), but 4.4 positions' worth per position up to
L = 128 and 2.5 past 768 under a gradient, 2.0 to 1.2 without. MLX orders a graph breadth-first
(MLX_BFS_MAX_WIDTH, 20 arrays wide), so several chunks' vocabulary-wide temporaries are alive at
once; at width 1 the update still held 2.8 positions' worth at L = 256 (3.7 at 20). A quantized
or half-precision head holds HEAD_QUANTIZED times a float32 one's (its logits are cast to float32),
and on a GPU a quantized head under a gradient UPDATE_HEAD_QUANTIZED_GPU times. The per-token
constants count activation elements per position (per adapted block for `u_H`, `u_I`).

The constants and how they were measured: `memory_laws.py`; the model's shape, read from its
config.json: `model_shape.py`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, cast

from cast_mlx import config as cfg
from cast_mlx.engine import fastmath, models
from cast_mlx.engine.logprobs import SPLIT_MODEL_TYPES
from cast_mlx.training import memory_laws as laws
from cast_mlx.training.model_shape import KNOWN_TYPES, Shape, load_tokenizer, model_config, shape_of

GB = 2**30
DEFAULT_MICRO_BATCH = cfg.OptimizerConfig().micro_batch_size  # what `auto` falls back to without a plan
PROMPTS_TOKENIZED = 16  # the longest prompts (by characters) that are tokenized for the plan

# --------------------------------------------------------------------------- the workload


@dataclass(frozen=True)
class Workload:
    """What a step of the recipe puts in memory, per process."""

    dtype: str  # resolved: float32, bfloat16, float16 or quantized
    prompts: int  # this process's prompts per step
    group: int
    max_new: int
    max_batch: int
    micro_batch: int
    rank: int
    lora_layers: int  # -1: all
    keys: tuple[str, ...]
    prompt_tokens: int  # the longest prompt
    teacher_tokens: int = 0  # the longest teacher context (0: no teacher pass)
    snapshot: float = 0.0  # LoRA copies the teacher holds (1: snapshot/ema, 0.5: base)
    reference: bool = False  # loss.beta > 0: a KL reference pass and its copy
    same_context: bool = False  # teacher.context same: the old policy of the rows the update skips (at worst all)
    share_prefix: bool = True
    reuse_frozen: bool = True
    gpu: bool = False  # MLX computes on a GPU (Metal, CUDA), where a quantized head's gradient holds more


def weight_bytes(s: Shape, dtype: str) -> int:
    block = sum(i * o for i, o in s.linears().values())
    small = s.layers * (2 * s.hidden + ((s.heads + 2 * s.kv_heads) * s.head_dim if s.bias else 0)) + s.hidden
    if s.model_type == "qwen3":
        small += s.layers * 2 * s.head_dim
    embed = s.vocab * s.hidden
    if dtype == "quantized" and s.quant:
        quant = s.quant

        def packed(n: int, module: str) -> float:
            own = quant.get(module)
            q = own if isinstance(own, dict) else quant
            bits, group = int(q.get("bits", 4)), int(q.get("group_size", 64))
            return n * bits / 8 + n / group * 2 * 2  # scales and biases, 2 bytes each

        head = 0.0 if s.tied else packed(embed, "lm_head")
        total = s.layers * packed(block, "") + packed(embed, "model.embed_tokens") + head + small * 2
        return int(total)
    per = weight_element_bytes(s, dtype)
    return (s.layers * block + embed * (1 if s.tied else 2) + small) * per


def weight_element_bytes(s: Shape, dtype: str) -> int:
    return {"float32": 4, "bfloat16": 2, "float16": 2}.get(dtype, 2 if s.quant else s.float_bytes)


def activation_bytes(s: Shape, dtype: str) -> int:
    return {"float32": 4, "bfloat16": 2, "float16": 2}.get(dtype, 2 if s.quant else s.float_bytes)


def lora_layers(s: Shape, w: Workload) -> int:
    return s.layers if w.lora_layers < 0 else min(w.lora_layers, s.layers)


def frozen_split(s: Shape, w: Workload) -> int:
    """logprobs.frozen_blocks: the blocks below the first adapted one, when they are skipped."""
    k = lora_layers(s, w)
    return s.layers - k if w.reuse_frozen and s.model_type in SPLIT_MODEL_TYPES and 0 < k < s.layers else 0


def _interpolate(table: tuple, length: int) -> float:
    """Positions' worth of logits held for a row of `length` positions (piecewise linear in
    `length` between the measured points; constant per position before the first, the last
    point's per-position value after the last)."""
    (l0, f0), (ln, fn) = table[0], table[-1]
    if length <= l0:
        return f0 * length
    if length >= ln:
        return fn * length
    for (a, fa), (b, fb) in zip(table, table[1:]):
        if a <= length <= b:
            return fa * a + (fb * b - fa * a) * (length - a) / (b - a)
    return fn * length  # pragma: no cover - the table is sorted


def pass_size(w: Workload, teacher: bool) -> tuple[int, int]:
    """`(rows, positions)` whose memory a teacher pass or an update micro-batch holds at once:
    a micro-batch's rows (at most `G` with the shared prefix, whose buckets hold one prompt's
    rows), or every row of the step for the old policy's log-probs of a `same`-context teacher
    and the KL reference, which `teacher.model_logprobs` evaluates in one go over all its
    micro-batches; the positions count each bucket's context once with the shared prefix."""
    rows = w.prompts * w.group
    n = min(w.micro_batch, w.group if w.share_prefix else rows, rows)
    context = max(w.teacher_tokens, w.prompt_tokens) if teacher else w.prompt_tokens
    buckets = 1
    if teacher and (w.same_context or w.reference):
        n, buckets = rows, -(-rows // n)
    return n, n * w.max_new + buckets * context if w.share_prefix else n * (context + w.max_new)


def predict(s: Shape, w: Workload) -> dict[str, int]:
    """Each phase's predicted peak (bytes; `teacher` is the resident memory when no teacher
    or reference pass runs) and the parts they are made of."""
    b_a, k = activation_bytes(s, w.dtype), lora_layers(s, w)
    lin = s.linears()
    keys = [lin[key] for key in w.keys if key in lin]
    lora = k * sum(w.rank * (i + o) for i, o in keys) * 4
    weights = weight_bytes(s, w.dtype)
    stored = "quantized" if s.quant else {4: "float32", 2: "bfloat16"}[s.float_bytes]
    converted = w.dtype != stored and not (w.dtype == "quantized" and not s.quant)
    load = weight_bytes(s, stored) + weights * (1 + laws.LOAD_EXTRA) if converted else weights
    resident = weights + lora * (3 + w.snapshot + (0.5 if w.reference else 0))
    rows = w.prompts * w.group
    states = rows * w.max_new * s.hidden * b_a if frozen_split(s, w) else 0
    streams = min(w.prompts, max(1, w.max_batch // w.group)) * w.group
    kv = s.layers * 2 * streams * s.kv_heads * s.head_dim * (w.prompt_tokens + w.max_new) * b_a
    merged = 0 if w.dtype == "quantized" else k * sum(i * o for i, o in keys) * weight_element_bytes(s, w.dtype)
    decode = merged + kv + states + laws.ROLLOUT_LOGITS * streams * s.vocab * 4
    rollout = resident + max(decode, laws.ROLLOUT_STATES * states)
    head_factor = 1.0 if w.dtype == "float32" else laws.HEAD_QUANTIZED
    teacher = resident + states
    if w.teacher_tokens or w.reference:
        n, tok = pass_size(w, teacher=True)
        teacher += n * s.vocab * 4 * _interpolate(laws.TEACHER_HEAD, w.max_new) * head_factor
        teacher += tok * (laws.TEACHER_H * s.hidden + laws.TEACHER_I * s.intermediate) * b_a
    n, tok = pass_size(w, teacher=False)
    update_factor = laws.UPDATE_HEAD_QUANTIZED_GPU if w.gpu and w.dtype == "quantized" else head_factor
    head = n * s.vocab * 4 * _interpolate(laws.UPDATE_HEAD, w.max_new) * update_factor
    per_block = laws.UPDATE_H * s.hidden + laws.UPDATE_I * s.intermediate
    layers = k * tok * per_block * b_a + tok * laws.UPDATE_T * s.hidden * b_a
    update = resident + states + 2 * lora + head + layers
    return {
        "load": int(load),
        "rollout": int(rollout),
        "teacher": int(teacher),
        "update": int(update),
        "weights": int(weights),
        "lora": int(lora),
        "resident": int(resident),
        "states": int(states),
        "kv": int(kv),
        "merged": int(merged),
    }


PHASES = ("load", "rollout", "teacher", "update")


def peak_of(parts: dict[str, int]) -> tuple[str, int]:
    phase = max(PHASES, key=lambda p: parts[p])
    return phase, parts[phase]


# --------------------------------------------------------------------------- the recipe's plan


def longest_prompts(recipe: cfg.Recipe, problems: list, tokenizer) -> tuple[int, int]:
    """The longest prompt's tokens and the longest teacher context's, among the
    `PROMPTS_TOKENIZED` longest questions (a tokenizer's count; without one, an estimate of a
    token per 2 bytes plus 64 for the chat template)."""
    from cast_mlx.algorithm.teacher import teacher_contexts
    from cast_mlx.tasks import data

    d = recipe.data
    longest = sorted(problems, key=lambda p: len(str(p.messages or p.question)), reverse=True)[:PROMPTS_TOKENIZED]
    if not longest:
        return 0, 0
    if tokenizer is None:
        size = max(len(str(p.messages or p.question).encode()) + len((d.system_prompt or "").encode()) for p in longest)
        reference = max(len(str(p.solution or p.gold).encode()) for p in longest)
        return size // 2 + 64, (size + reference) // 2 + 64
    prompts = [data.prompt_ids(tokenizer, p, d.system_prompt, d.answer_format) for p in longest]
    contexts = teacher_contexts(
        recipe.teacher.context,
        tokenizer,
        [p.question for p in longest],
        prompts,
        [p.solution or p.gold for p in longest],
        data.ANSWER_INSTRUCTIONS.get(d.answer_format, ""),
    )
    return max(len(p) for p in prompts), max(len(c) for c in contexts)


def workload(recipe: cfg.Recipe, prompt_tokens: int, teacher_tokens: int, world_size: int = 1) -> Workload:
    from cast_mlx.algorithm.estimators import get_estimator

    r, t = recipe, recipe.teacher
    uses_teacher = get_estimator(r.algorithm.name).uses_teacher
    micro = r.optimizer.micro_batch_size
    return Workload(
        dtype=models.resolve_dtype(r.model.dtype),
        prompts=max(1, r.sampling.prompts_per_step // world_size),
        group=r.sampling.group_size,
        max_new=r.sampling.max_new_tokens,
        max_batch=r.sampling.max_batch,
        micro_batch=micro if isinstance(micro, int) else r.sampling.prompts_per_step * r.sampling.group_size,
        rank=r.lora.rank,
        lora_layers=r.lora.num_layers,
        keys=tuple(r.lora.keys),
        prompt_tokens=prompt_tokens,
        teacher_tokens=teacher_tokens if uses_teacher else 0,
        snapshot=(0.5 if t.kind == "base" else 1.0) if uses_teacher else 0.0,
        reference=r.loss.beta > 0,
        same_context=uses_teacher and t.context == "same",
        share_prefix=r.system.share_prefix,
        reuse_frozen=r.system.reuse_frozen,
        gpu=not fastmath.on_cpu(),
    )


@dataclass
class Plan:
    """A recipe's memory plan: the phases' predicted peaks against the budget, and the
    micro-batch it runs with (`auto` resolved)."""

    parts: dict[str, int]
    budget: int
    budget_label: str  # "system.memory_limit_gb = 12 GB" or "this machine's 24 GB"
    micro_batch: int
    auto: bool = False  # optimizer.micro_batch_size was auto

    @property
    def peak(self) -> int:
        return peak_of(self.parts)[1]

    def line(self) -> str:
        parts = self.parts
        teacher = "-" if parts["teacher"] == parts["resident"] + parts["states"] else gb(parts["teacher"])
        text = (
            f"load {gb(parts['load'])}, rollout {gb(parts['rollout'])}, teacher {teacher}, "
            f"update {gb(parts['update'])} "
            f"(peak {gb(self.peak)} of {self.budget / GB:.3g} GB)"
        )
        return text + (f"; micro_batch_size auto: {self.micro_batch}" if self.auto else "")


def gb(n: float) -> str:
    """Bytes as GB: two decimals, or three significant digits below 0.1 GB."""
    return f"{n / GB:.2f} GB" if n >= 0.1 * GB else f"{n / GB:.3g} GB"


def adjusted(w: Workload, field: str, value: int) -> Workload:
    name = {
        "optimizer.micro_batch_size": "micro_batch",
        "sampling.max_batch": "max_batch",
        "sampling.max_new_tokens": "max_new",
        "sampling.group_size": "group",
        "lora.num_layers": "lora_layers",
    }[field]
    return replace(w, **cast("dict[str, Any]", {name: value}))


def largest_fitting(s: Shape, w: Workload, field: str, candidates, budget: int) -> int | None:
    """The largest of `candidates` (descending) with which the plan fits the budget."""
    for value in candidates:
        if peak_of(predict(s, adjusted(w, field, value)))[1] <= budget:
            return value
    return None


def remedy(s: Shape, w: Workload, budget: int) -> tuple[str, int] | None:
    """The first field (micro-batch, decode streams, token cap, group size, LoRA layers) that
    one change brings under the budget, with its largest value that does."""
    k = lora_layers(s, w)
    tries = [
        ("optimizer.micro_batch_size", range(w.micro_batch - 1, 0, -1)),
        ("sampling.max_batch", [w.group * m for m in range(w.max_batch // w.group - 1, 0, -1)]),
        ("sampling.max_new_tokens", _descending(w.max_new)),
        ("sampling.group_size", range(w.group - 1, 1, -1)),
        ("lora.num_layers", range(k - 1, 0, -1)),
    ]
    for field, candidates in tries:
        value = largest_fitting(s, w, field, candidates, budget)
        if value is not None:
            return field, value
    return None


def _descending(cap: int) -> list[int]:
    """Token caps below `cap`: in steps of 16 near it, then halving."""
    steps = list(range(cap - cap % 16 - (16 if cap % 16 == 0 else 0), max(cap // 2, 15), -16))
    while steps and steps[-1] > 16:
        steps.append(steps[-1] // 2)
    return [c for c in steps if 0 < c < cap]


def plan_run(recipe: cfg.Recipe, problems: list, world_size: int = 1) -> tuple[Plan | None, str | None]:
    """The recipe's plan, checked against its budget (`preflight.memory_budget`): a
    ConfigError naming the field to change and the value that fits when the predicted peak
    is over it; `micro_batch_size: auto` resolved to the largest that fits. `(None, note)`
    when no plan can be made (the run goes on without one)."""
    from cast_mlx.training.preflight import memory_budget

    config, folder, note = model_config(recipe.model.name)
    shape = shape_of(config) if config else None
    if shape is None:
        why = note or f"model type {config.get('model_type')!r} is not one it knows ({', '.join(KNOWN_TYPES)})"  # type: ignore[union-attr]
        if recipe.optimizer.micro_batch_size == "auto":
            why += f"; optimizer.micro_batch_size auto: {DEFAULT_MICRO_BATCH}, the field's default"
        return None, f"none ({why})"
    budget, label = memory_budget(recipe)
    try:
        prompt, teacher = longest_prompts(recipe, problems, load_tokenizer(folder))
    except Exception:  # noqa: BLE001 - a tokenizer that cannot build the prompts: estimate them
        prompt, teacher = longest_prompts(recipe, problems, None)
    work = workload(recipe, prompt, teacher, world_size)
    auto = recipe.optimizer.micro_batch_size == "auto"
    if auto:
        rows = work.prompts * work.group
        picked = largest_fitting(shape, work, "optimizer.micro_batch_size", range(rows, 0, -1), budget)
        work = adjusted(work, "optimizer.micro_batch_size", picked or 1)
    parts = predict(shape, work)
    phase, peak = peak_of(parts)
    if peak > budget:
        fix = remedy(shape, work, budget)
        said = f"the memory plan's {phase} peaks at {gb(peak)}, above {label}"
        if fix is None:
            raise cfg.ConfigError(
                f"system.memory_limit_gb: {said}, and no single smaller optimizer.micro_batch_size, "
                f"sampling.max_batch, sampling.max_new_tokens, sampling.group_size or lora.num_layers fits "
                f"(the weights alone take {gb(parts['weights'])})"
            )
        field, value = fix
        fits = gb(peak_of(predict(shape, adjusted(work, field, value)))[1])
        extra = " (or auto)" if field == "optimizer.micro_batch_size" else ""
        raise cfg.ConfigError(f"{field}: {said}; {field}={value}{extra} fits ({fits})")
    return Plan(parts, budget, label, work.micro_batch, auto), None


def with_micro_batch(recipe: cfg.Recipe, plan: Plan | None) -> cfg.Recipe:
    """The recipe the run uses: `optimizer.micro_batch_size: auto` replaced by the plan's
    pick (by the field's default when there is no plan)."""
    if recipe.optimizer.micro_batch_size != "auto":
        return recipe
    value = plan.micro_batch if plan is not None else DEFAULT_MICRO_BATCH
    return replace(recipe, optimizer=replace(recipe.optimizer, micro_batch_size=value))


def describe(plan: Plan | None, note: str | None) -> str:
    """The header's `memory` entry."""
    if plan is None:
        return note or "no plan"
    return plan.line()
