"""Studies: run, track, select and compare Optuna studies of Keras models.

Commands (`python -m studies.<name>`): run, select, replay, compare, dashboard; each is thin and
nothing imports one. The library below them: config, storage, engines, tracking, selection,
reporting; cli (what the commands share), settings (the environment), faults (what to retry).
"""
