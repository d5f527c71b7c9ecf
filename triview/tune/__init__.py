"""Hyperparameter search over the pipeline's own parameters (``triview tune``).

One concern per module: ``space`` (the search space file, checked against the spec),
``runner`` (one trial: the DAG's stages up to the voter, in this process, each output kept
under a key of what it reads), ``objective`` (the validation figure a trial is worth),
``study`` (the seeded Optuna study, pruning, resume, the best trial scored on test once),
``results`` (trials table, HTML report, the best preset) and ``cluster`` (the same search
as a Kubeflow Trainer OptimizationJob, and the trial its TrainJobs run).
"""
