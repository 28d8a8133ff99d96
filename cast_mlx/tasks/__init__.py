"""The tasks and their judging: problems and prompts per task (`data`), the safe math
verifier (`verify`) and reward functions with user plug-ins (`rewards`).
Imports the engine at most, never the algorithm or training."""
