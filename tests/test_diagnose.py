"""`cast_mlx.diagnose`: hand-computed statistics, the verdict, and a run on the embedded model
with a fake teacher whose gaps are known."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cast_mlx.training import diagnose as dg
from cast_mlx.training import diagnose_batch as db

from helpers import ROOT, run_cli


def test_auc_by_hand():
    assert dg.auc([0.9, 0.4, 0.6, 0.1], [1, 0, 1, 0]) == 1.0
    assert dg.auc([0.9, 0.4, 0.6, 0.1], [0, 1, 0, 1]) == 0.0
    # pairs (1 vs 1) = 1/2 and (1 vs 0) = 1: (0.5 + 1) / 2
    assert dg.auc([1.0, 1.0, 0.0], [1, 0, 0]) == 0.75
    assert dg.auc([1.0, 2.0], [1, 1]) is None


def test_bootstrap_auc_resamples_prompts():
    # perfectly separated: every resample that has both classes gives 1
    assert dg.bootstrap_auc([2, 1, 2, 1], [1, 0, 1, 0], [0, 0, 1, 1], n_resamples=200) == (1.0, 1.0)
    # one prompt holds everything: every resample is the same rows, so the CI is the point
    scores, labels = [0.3, 0.1, 0.2, 0.4], [1, 0, 0, 1]
    point = dg.auc(scores, labels)
    assert dg.bootstrap_auc(scores, labels, [5, 5, 5, 5], n_resamples=50) == (point, point)
    assert dg.bootstrap_auc([1, 2], [0, 0], [0, 1]) == (None, None)
    # the same seed gives the same interval
    rng = np.random.default_rng(0)
    s, y, c = rng.normal(size=40), rng.random(40) > 0.5, np.repeat(np.arange(10), 4)
    assert dg.bootstrap_auc(s, y, c, seed=3) == dg.bootstrap_auc(s, y, c, seed=3)


def test_noise_profile_and_tail_mask():
    p = dg.noise_profile([1.0, 2.0, 3.0, 4.0])
    assert p["n"] == 4 and p["mean"] == 2.5 and p["median"] == 2.5
    assert p["std"] == pytest.approx(np.sqrt(1.25)) and p["cv"] == pytest.approx(np.sqrt(1.25) / 2.5)
    assert p["p90"] == pytest.approx(3.7)
    assert dg.noise_profile([])["mean"] is None
    # 5% of 40 tokens is 2; of 3 tokens it rounds up to 1
    m = dg.tail_mask([40, 3], 40)
    assert m[0].nonzero()[0].tolist() == [38, 39] and m[1].nonzero()[0].tolist() == [2]


def test_token_classes_and_group_mix():
    assert dg.token_class("<|im_end|>", special=True) == "special"
    assert [dg.token_class(t, False) for t in (" 7", "####", "\\boxed", " .", " ", "cats")] == [
        "digit",
        "marker",
        "marker",
        "punct",
        "punct",
        "word",
    ]
    mix = dg.group_mix([1, 1, 0, 0, 1, 0], group_size=2)
    assert mix == pytest.approx({"all_correct": 1 / 3, "all_wrong": 1 / 3, "mixed": 1 / 3})


def hand_batch():
    """2 prompts x 2 completions; row 0 correct (3 tokens, the last an EOS), row 1 wrong
    (2 tokens, EOS), row 2 correct (2 tokens, truncated), row 3 wrong (3 tokens, EOS)."""
    gaps = np.array([[0.5, -0.2, -1.0], [0.3, -2.0, 0.0], [0.1, 0.2, 0.0], [-0.4, 0.0, -1.5]])
    mask = np.array([[1, 1, 1], [1, 1, 0], [1, 1, 0], [1, 1, 1]], dtype=np.float32)
    correct = np.array([True, False, True, False])
    prompt = np.array([0, 0, 1, 1])
    classes = np.array(
        [
            ["digit", "word", "special"],
            ["word", "special", "word"],
            ["digit", "digit", "word"],
            ["punct", "word", "special"],
        ]
    )
    is_eos = np.array([[0, 0, 1], [0, 1, 0], [0, 0, 0], [0, 0, 1]], dtype=bool)
    return gaps, mask, correct, prompt, classes, is_eos


def test_analyse_by_hand():
    r = dg.analyse(*hand_batch(), n_resamples=100)
    # 10 completion tokens: correct 5 (pos 0.5, 0.1, 0.2; neg -0.2, -1.0), wrong 5 (pos 0.3;
    # neg -2.0, -0.4, -1.5; zero 0.0)
    t = r["table"]
    assert t["correct_pos"]["share"] == 0.3 and t["correct_neg"]["share"] == 0.2
    assert t["wrong_pos"]["share"] == 0.1 and t["wrong_neg"]["share"] == 0.3
    assert t["correct_neg"]["abs_mean"] == pytest.approx(0.6)
    assert t["wrong_neg"]["abs_mean"] == pytest.approx((2.0 + 0.4 + 1.5) / 3)
    assert r["p_pos_given_correct"] == 0.6 and r["p_pos_given_wrong"] == 0.2
    assert r["zero_share"] == 0.1
    # completion-mean gaps: correct -0.7/3 and 0.15, wrong -0.85 and -1.9/3: every correct
    # above every wrong
    assert r["separation"]["mean_gap"]["auc"] == 1.0
    # shares of g > 0: correct 1/3 and 1, wrong 1/2 and 0: 1/3 loses to 1/2 only
    assert r["separation"]["pos_share"]["auc"] == 0.75
    # EOS tokens: rows 0, 1, 3, all with g < 0: median of (-1.0, -2.0, -1.5)
    assert r["eos"]["n"] == 3 and r["eos"]["neg_share"] == 1.0 and r["eos"]["median_gap"] == -1.5
    assert r["eos"]["correct_neg_share"] == 1.0 and r["eos"]["wrong_neg_share"] == 1.0
    # content = not EOS and not special: 7 tokens, 2 of them negative (-0.2, -0.4)
    assert r["content_neg_share"] == pytest.approx(2 / 7)
    assert r["by_class"]["digit"]["share"] == 0.3
    assert r["by_class"]["digit"]["mean_gap"] == pytest.approx((0.5 + 0.1 + 0.2) / 3)
    assert r["by_class"]["special"]["neg_share"] == 1.0
    # the last 5% of each completion is its last token: -1.0, -2.0, 0.2, -1.5 of |g| 6.2
    assert r["tail_mass"]["share_of_tokens"] == 0.4
    assert r["tail_mass"]["share_of_abs_gap"] == pytest.approx(4.7 / 6.2)


def test_answer_tokens_and_their_auc_by_hand():
    gaps = np.array([[0.2, 1.0, 0.0], [0.1, -0.5, 0.4], [-1.0, 0.3, 0.0], [0.0, 0.2, 0.6]])
    mask = np.array([[1, 1, 1], [1, 1, 1], [1, 1, 0], [1, 1, 1]], dtype=np.float32)
    classes = np.array(
        [
            ["word", "digit", "special"],
            ["digit", "word", "digit"],
            ["word", "digit", "word"],
            ["digit", "digit", "word"],
        ]
    )
    is_eos = np.zeros((4, 3), dtype=bool)
    is_eos[0, 2] = True
    # the last run of digit tokens of each row
    assert dg.answer_tokens(classes, mask > 0).astype(int).tolist() == [[0, 1, 0], [0, 0, 1], [0, 1, 0], [1, 1, 0]]
    r = dg.analyse(
        gaps, mask, np.array([True, False, True, False]), np.array([0, 0, 1, 1]), classes, is_eos, n_resamples=50
    )
    # answer gaps: correct 1.0, 0.3; wrong 0.4, 0.1: three of four pairs ordered
    assert r["separation"]["answer_gap"]["auc"] == 0.75 and r["separation"]["answer_gap"]["rows"] == 4
    # minus the content mean (0.6, 0, -0.35, 0.8/3): correct 0.4, 0.65; wrong 0.4, 0.1 - 0.8/3: one tie
    assert r["separation"]["answer_gap_centred"]["auc"] == 0.875


def test_verdict_lines():
    good = {"separation": {"mean_gap": {"ci_low": 0.6}}}
    bad = {"separation": {"mean_gap": {"ci_low": 0.45}}}
    authors = {"all_correct": 0.2, "all_wrong": 0.31, "mixed": 0.49}
    hard = {"all_correct": 0.0, "all_wrong": 0.8, "mixed": 0.2}
    line = dg.verdict({"question-only": bad, "instructed": good}, authors)
    assert "with: instructed" in line and "is in the authors' range" in line
    assert line.endswith("CAST is worth a run with teacher.context=instructed.")
    line = dg.verdict({"question-only": bad, "privileged": good}, hard)
    assert "only the answer-showing privileged context does" in line and "use GRPO" in line
    assert "is outside the authors' range" in line and "easier task" in line
    assert "no context gives a gap that separates" in dg.verdict({"question-only": bad}, authors)
    # a CI entirely below 0.5 is anti-separation, not "reaches 0.5"; the default is named
    anti = {"separation": {"mean_gap": {"ci_low": 0.30, "ci_high": 0.45}}}
    line = dg.verdict({"question-only": anti, "instructed": bad}, authors, default="The default recipe trains X.")
    assert (
        "it anti-separates (AUC CI below 0.5" in line and "harmful under CAST's flip rule) with: question-only" in line
    )
    assert "use GRPO (algorithm.name=grpo)" in line and line.endswith("The default recipe trains X.")
    assert [dg.separation(m) for m in ({"ci_low": 0.51, "ci_high": 0.7}, {"ci_low": 0.2, "ci_high": 0.49})] == [
        "separates",
        "anti-separates",
    ]
    assert (
        dg.separation({"ci_low": 0.45, "ci_high": 0.55}) == dg.separation({"ci_low": None, "ci_high": None}) == "none"
    )


def fake_scorer(seen):
    """Teacher log-probs = the sampler's + 1 on rows of even index, - 1 on odd ones."""
    import mlx.core as mx

    def scorer(contexts, tokens, mask, lp_old):
        seen.append(contexts)
        sign = mx.array([1.0 if i % 2 == 0 else -1.0 for i in range(tokens.shape[0])])[:, None]
        return lp_old + sign

    return scorer


def test_collect_with_a_fake_teacher_on_the_embedded_model(smol):
    from cast_mlx.algorithm.teacher import REFERENCE_HEADER, STUDENT_HEADER
    from cast_mlx.config import SamplingConfig
    from cast_mlx.tasks import data

    model, tok = smol
    problems = data.load_task("arithmetic", "train", n=3, level=1, seed=0)
    seen = []
    sampling = SamplingConfig(temperature=1.0, max_new_tokens=24)
    c = db.collect(
        model,
        tok,
        problems,
        contexts=["question-only", "instructed", "privileged"],
        group_size=4,
        sampling=sampling,
        answer_format="hash",
        system_prompt=None,
        reward="lenient",
        seed=0,
        scorer=fake_scorer(seen),
    )
    n = 12
    assert c.mask.shape[0] == n and c.correct.shape == (n,) and c.prompt_index.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    # every context reached the scorer, one per row, built from the problem
    plain, instructed, privileged = (rows[0] for rows in seen)
    text = [tok.decode(ctx) for ctx in (plain, instructed, privileged)]
    assert text[0] == f"{problems[0].question}\n\n{STUDENT_HEADER}\n"
    assert data.ANSWER_INSTRUCTIONS["hash"] in text[1] and STUDENT_HEADER in text[1]
    assert REFERENCE_HEADER in text[2] and problems[0].gold in text[2]
    # the known gaps: +1 / -1 on every real token of even / odd rows
    on = c.mask.astype(bool)
    even = (np.arange(n) % 2 == 0)[:, None] & on
    np.testing.assert_allclose(c.gaps["question-only"][even], 1.0, atol=1e-6)
    np.testing.assert_allclose(c.gaps["question-only"][on & ~even], -1.0, atol=1e-6)
    assert np.all(c.gaps["question-only"][~on] == 0)
    # EOS flags sit on the last token of the completions that ended
    assert c.is_eos.sum() == (~c.truncated).sum()
    doc = dg.report(c, group_size=4, n_resamples=50)
    r = doc["contexts"]["question-only"]
    rows_c = np.broadcast_to(c.correct[:, None], on.shape)
    assert r["table"]["correct_pos"]["share"] == pytest.approx((even & rows_c).sum() / on.sum())
    assert r["table"]["wrong_neg"]["share"] == pytest.approx((on & ~even & ~rows_c).sum() / on.sum())
    expected_auc = dg.auc([1.0 if i % 2 == 0 else -1.0 for i in range(n)], c.correct)
    assert r["separation"]["mean_gap"]["auc"] == expected_auc
    assert [row["mean_gap"]["question-only"] for row in doc["completions"]] == pytest.approx([1, -1] * 6, abs=1e-6)
    assert doc["groups"] == dg.group_mix(c.correct, 4)
    assert doc["verdict"].startswith(("the gap separates", "no context gives"))


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--contexts", "plain,nope"], "--contexts 'plain,nope': choose from instructed, question-only, privileged"),
        (["--contexts", "same"], "--contexts same: the teacher here is the policy itself"),
        (["--contexts", "same"], "(give --teacher-adapter to measure a lagged teacher)"),
        (["--teacher-adapter", "/nope"], "--teacher-adapter /nope: no such folder"),
        (["--temperature", "-1"], "sampling.temperature: must be > 0.0"),
        (["--task", "chess"], "--task 'chess': expected one of"),
        (["--n", "0"], "--n must be >= 1"),
        (["--set", "algorithm.name=nope"], "algorithm.name"),
    ],
)
def test_bad_arguments_exit_2_before_loading(tmp_path, args, expected):
    proc = run_cli("-m", "cast_mlx.diagnose", "--out", str(tmp_path / "d.json"), *args)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], proc.stderr
    assert not (tmp_path / "d.json").exists()


def test_cli_on_the_embedded_model(tmp_path, smol_dir):
    out = tmp_path / "d.json"
    proc = run_cli(
        "-m",
        "cast_mlx.diagnose",
        "--recipe",
        str(ROOT / "recipes/smoke.yaml"),
        "--n",
        "2",
        "--group-size",
        "2",
        "--max-new-tokens",
        "8",
        "--contexts",
        "plain,instructed",
        "--set",
        "sampling.filter_order=sequential",
        "--out",
        str(out),
    )
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(out.read_text())
    assert set(doc["contexts"]) == {"question-only", "instructed"} and len(doc["completions"]) == 4
    assert doc["settings"]["sampling"]["max_new_tokens"] == 8 and doc["settings"]["sampling"]["group_size"] == 2
    assert doc["settings"]["sampling"]["filter_order"] == "sequential"
    assert "(top-p over top-k, sequential)" in " ".join(proc.stdout.split())
    assert " ".join(doc["verdict"].split()) in " ".join(proc.stdout.split())  # rich wraps the line


def test_gradient_comparison_by_hand():
    # cosine and the relative difference: v = (1, 0) against g = (1, 1)
    out = dg.compare_vectors(np.array([1.0, 0.0]), np.array([1.0, 1.0]))
    assert out["cosine"] == pytest.approx(2**-0.5) and out["relative_difference"] == pytest.approx(2**-0.5)
    assert dg.compare_vectors(None, np.ones(2))["cosine"] is None
    # token weights: the variant halves the correct row's tokens and flips one wrong token
    variant = np.array([[0.5, 0.5], [-1.0, 1.0]])
    grpo = np.array([[1.0, 1.0], [-1.0, -1.0]])
    w = dg.token_weights(variant, grpo, np.ones((2, 2), dtype=bool), np.array([True, False]))
    assert w == {"weight_correct": 0.5, "flipped_correct": 0.0, "weight_wrong": 0.0, "flipped_wrong": 0.5}


def tiny_batch(tiny_model_dir, *overrides):
    """The tiny model with the recipe's LoRA, and a hand-made batch: 2 prompts x 4 rows,
    rewards 1, 1, 0, 0 in each group (so every group is mixed, with the same std)."""
    import mlx.core as mx

    from cast_mlx import config as cfg
    from cast_mlx.engine import models

    recipe = cfg.load_recipe(None, ["lora.num_layers=1", "sampling.group_size=4", *overrides])
    model, _ = models.load(str(tiny_model_dir))
    assert db.lora_views(model, recipe, None, None) is None
    rng = np.random.default_rng(0)
    tokens = mx.array(rng.integers(3, 20, size=(8, 5)), dtype=mx.int32)
    mask = mx.array((np.arange(5)[None, :] < rng.integers(2, 6, size=(8, 1))).astype(np.float32))
    correct = np.array([1, 1, 0, 0] * 2, dtype=bool)
    batch = {
        "contexts": [[1, 5, 6]] * 4 + [[1, 7]] * 4,
        "tokens": tokens,
        "mask": mask,
        "truncated": mx.zeros((8,)),
        "special": mx.zeros((8, 5)),
        "rewards": mx.array(correct.astype(np.float32)),
    }
    gaps = {"instructed": rng.normal(scale=0.5, size=(8, 5)) * np.array(mask)}
    empty = np.zeros(8)
    words, no_eos = np.full((8, 5), "word"), np.zeros((8, 5), bool)
    c = dg.Collected(gaps, np.array(mask), correct, np.repeat([0, 1], 4), words, no_eos, empty, empty > 0, {}, batch)
    return model, recipe, c


def test_vs_grpo_on_the_same_batch(tiny_model_dir):
    # GRPO against itself: the same gradient
    model, recipe, c = tiny_batch(tiny_model_dir, "algorithm.name=grpo")
    same = db.gradient_comparison(model, recipe, c, group_size=4)
    assert same["cosine"] == pytest.approx(1.0, abs=1e-6) and same["relative_difference"] == pytest.approx(0, abs=1e-6)
    # unscaled GRPO: B = +-0.5 against +-0.5 / sqrt(1/3) (eps 0): the same direction, 0.577 of the size
    model, recipe, c = tiny_batch(
        tiny_model_dir, "algorithm.name=grpo", "algorithm.scale_rewards=none", "algorithm.eps=0"
    )
    scaled = db.gradient_comparison(model, recipe, c, group_size=4)
    assert scaled["cosine"] == pytest.approx(1.0, abs=1e-5)
    assert scaled["relative_difference"] == pytest.approx(1 - 3**-0.5, abs=1e-4)
    assert scaled["weight_correct"] == pytest.approx(3**-0.5, abs=1e-5) == scaled["weight_wrong"]
    # CAST's flip rule with a teacher's gaps: another direction
    model, recipe, c = tiny_batch(tiny_model_dir, "algorithm.name=cast", "teacher.context=instructed")
    cast = db.gradient_comparison(model, recipe, c, group_size=4)
    assert cast["cosine"] < 0.99 and cast["flipped_correct"] > 0 and cast["flipped_wrong"] > 0


def test_a_lagged_teacher_on_the_students_prompt(tiny_model_dir):
    import mlx.core as mx
    from mlx.utils import tree_unflatten

    from cast_mlx import config as cfg
    from cast_mlx.engine import models
    from cast_mlx.tasks import data

    recipe = cfg.load_recipe(None, ["lora.num_layers=1"])
    model, tok = models.load(str(tiny_model_dir))
    db.lora_views(model, recipe, None, None)
    policy = {k: (v + 0.05 if k.endswith("lora_b") else v) for k, v in models.lora_state(model).items()}
    model.update(tree_unflatten(list(policy.items())))  # a trained policy: its lora_b is not 0
    base = db.lora_views(model, recipe, "policy", "base")
    assert all(not mx.any(v).item() for k, v in base.items() if k.endswith("lora_b"))
    problems = data.load_task("arithmetic", "train", n=2, level=1, seed=0)
    common = dict(
        contexts=["same"], group_size=2, sampling=cfg.SamplingConfig(max_new_tokens=6), answer_format="hash",
        system_prompt=None, reward="lenient", seed=0,
    )  # fmt: skip
    lagged = db.collect(model, tok, problems, teacher_params=base, **common)
    at_refresh = db.collect(model, tok, problems, teacher_params=models.lora_state(model), **common)
    on = lagged.mask > 0
    assert np.abs(lagged.gaps["same"][on]).max() > 1e-3  # the weight lag
    assert np.all(at_refresh.gaps["same"] == 0)  # no lag: exactly 0
