"""The training job: the loop (`trainer`) over the stages, checkpoints, callbacks and the
dashboard, metrics, evaluation, diagnosis, summary and report. Imports every layer below;
no module here imports the loop except the command line."""
