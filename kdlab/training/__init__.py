"""The pieces of training that ``kdlab/train.py`` puts together: evaluation, teachers,
checks made before a run dir exists, optimisation, and probes run during training."""
