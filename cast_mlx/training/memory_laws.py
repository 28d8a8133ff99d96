"""The memory plan's data: the fitted constants `memory_plan.predict` reads, the points they
were fitted on, and the embedded model's config for a plan before its first fetch.

Calibration (`python scripts/fit_memory_plan.py` re-measures, fits and prints the constants and
the table): MLX's peak memory (`mx.get_peak_memory`, reset before each phase) of
`trainer.sample` to the full token cap (random weights never sample EOS) and of `trainer.learn`'s
teacher and update on a synthetic batch of rows of exactly `L` tokens, on random-weight models
of four shapes (scripts/scale_models.py's `tiny` and `smollm2-135m`, a 1024-wide 8-block llama
and a 4-block qwen2 of Qwen2.5-0.5B's widths and vocabulary), float32 and (tiny) 4-bit, on the
2-core EPYC CPU (MLX 0.32.4, MKL), prompts of 50 tokens; and models.load of the embedded model.
The head laws come from `tiny` (width 64: the head is nearly all its memory), the per-token
constants from the other shapes by least squares. At the 25 points of `CALIBRATION` every phase
is within 3% of its measured peak (its memory above the weights within 8%); at three points
left out (tests/test_memory_plan.py) within 1%. On CUDA (one H200, docs/benchmarks.md) float32
Qwen2.5-0.5B and 1.5B came within 3% (update) and 6% (rollout, teacher); but 4-bit Qwen2.5-0.5B
at the Mac recipe's shape (micro-batch 4) peaked at 8.87 GB in the update, 81% above the 4.90 GB
these CPU terms give (its rollout 0.83 against 0.52 and its teacher 2.35 against 2.12 came
closer). On a GPU the plan therefore counts a quantized head under a gradient at
`UPDATE_HEAD_QUANTIZED_GPU`, the factor that puts that one point at its measured peak: fitted,
so that point is no test of it, and measured before the quantized head's backward became one
quantized matmul (`head.transpose_of`), which may hold less. Not measured: Metal (its
kernels differ, and the CPU's fused SwiGLU keeps fewer temporaries), the held-out eval's
generation, and dynamic sampling's extra rounds.
"""

# (L, positions' worth of [n, 1, V] float32 logits per completion position), interpolated in L
UPDATE_HEAD = ((32, 4.39), (64, 4.36), (128, 4.37), (256, 3.67), (512, 3.13), (768, 2.46), (1024, 2.55), (1536, 2.58))
TEACHER_HEAD = ((32, 2.02), (64, 2.01), (128, 2.01), (256, 1.99), (512, 1.74), (768, 1.41), (1024, 1.24))
UPDATE_H, UPDATE_I, UPDATE_T = 12.06, 4.86, 10.8  # activation elements per position and adapted layer; per position
TEACHER_H, TEACHER_I = 0.0, 4.76  # activation elements per position of a teacher pass
ROLLOUT_LOGITS, ROLLOUT_STATES = 1.28, 4.0  # [B, V] float32 logits in a decode step; S at the rollout's end
HEAD_QUANTIZED = 1.24  # a quantized (or half-precision) head's memory against a float32 head's
# A quantized head under a gradient on a GPU: fitted to the one point measured there (above);
# not printed by fit_memory_plan.py, which measures on the CPU
UPDATE_HEAD_QUANTIZED_GPU = 2.83
# models.load of a checkpoint stored in another dtype (the embedded 4-bit SmolLM2 run in float32):
# the stored weights, the converted ones and this share of the converted ones in temporaries
LOAD_EXTRA = 0.091  # measured: 653.7 MiB for the embedded SmolLM2-135M (predicted 653.6)
# The measured points (scripts/fit_memory_plan.py's POINTS): shape, dtype, algorithm, P, G,
# micro-batch, L, LoRA layers, max_batch, then MiB at the rollout's, teacher's and update's peak.
CALIBRATION = (  # fmt: skip
    ("tiny", "float32", "cast", 1, 2, 2, 32, 8, 64, None, 39, 73),
    ("tiny", "float32", "cast", 1, 2, 2, 64, 8, 64, None, 63, 128),
    ("tiny", "float32", "cast", 1, 2, 2, 128, 8, 64, None, 112, 239),
    ("tiny", "float32", "cast", 1, 2, 2, 256, 8, 64, None, 207, 393),
    ("tiny", "float32", "cast", 1, 2, 2, 512, 8, 64, None, 351, 666),
    ("tiny", "float32", "cast", 1, 2, 2, 768, 8, 64, None, 424, 796),
    ("tiny", "float32", "cast", 1, 2, 2, 1024, 8, 64, None, 496, 1091),
    ("tiny", "float32", "grpo", 1, 2, 2, 1536, 8, 64, None, 15, 1642),
    ("tiny", "float32", "cast", 2, 8, 8, 64, 8, 64, 23, 209, 458),
    ("smollm2-135m", "float32", "grpo", 1, 4, 4, 64, 4, 64, 592, 518, 797),
    ("smollm2-135m", "float32", "grpo", 1, 4, 4, 64, 16, 64, 766, 529, 1025),
    ("smollm2-135m", "float32", "grpo", 1, 4, 4, 128, 8, 64, 662, 522, 1196),
    ("smollm2-135m", "float32", "cast", 2, 8, 8, 64, 8, 64, 717, 740, 1208),
    ("smollm2-135m", "float32", "cast", 4, 8, 4, 64, 16, 16, 837, 648, 1043),
    ("wide", "float32", "grpo", 1, 4, 4, 64, 2, 64, 786, 662, 976),
    ("wide", "float32", "grpo", 1, 4, 4, 64, 6, 64, 1026, 670, 1124),
    ("wide", "float32", "cast", 2, 4, 4, 64, 4, 64, 918, 792, 1048),
    ("wide", "float32", "grpo", 1, 2, 2, 128, 6, 64, 1024, 670, 1122),
    ("qwen-wide", "float32", "grpo", 1, 2, 2, 64, 2, 64, 870, 752, 1135),
    ("qwen-wide", "float32", "cast", 1, 4, 4, 64, 2, 64, 872, 1076, 1502),
    ("qwen-wide", "float32", "grpo", 1, 2, 2, 128, 2, 64, 870, 753, 1478),
    ("tiny", "4bit", "cast", 1, 4, 4, 64, 8, 64, None, 124, 268),
    ("tiny", "4bit", "cast", 1, 2, 2, 128, 8, 64, None, 124, 268),
    ("tiny", "float32", "cast-verl", 2, 8, 4, 64, 8, 64, None, 399, 239),
    ("smollm2-135m", "float32", "cast-verl", 2, 4, 4, 64, 8, 64, None, 723, 880),
)

# The embedded model's converted config (gguf_weights.convert_gguf) when it is not fetched yet.
BUILTIN_CONFIGS = {
    "smollm2-135m-instruct": {
        "model_type": "llama",
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "head_dim": 64,
        "vocab_size": 49152,
        "tie_word_embeddings": True,
        "quantization": {"group_size": 32, "bits": 4, "model.embed_tokens": {"group_size": 32, "bits": 8}},
    },
}
