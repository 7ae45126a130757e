"""Engines that run a study's trials: the session they share, the objective (one trial), the
Optuna loop, the KerasTuner engine, worker processes, the runner around them, and retraining
one trial alone."""
