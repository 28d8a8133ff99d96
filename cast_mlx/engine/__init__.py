"""The engine that runs the model: loading and LoRA (`models`), forward passes and per-token
log-probs (`logprobs`), sampling groups of completions (`rollout`), fast CPU math
(`fastmath`, `blas`) and the collectives of a data-parallel run (`distributed`).
Imports nothing from the other layers but `cast_mlx.config`."""
