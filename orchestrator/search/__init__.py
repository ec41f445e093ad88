"""Per-cell hyperparameter search with Optuna (the spec's `search:` section; its schema is
`orchestrator.spec.search`).

    study.py      one Optuna study per cell in the sweep folder's journal file; ask / tell / report
    scheduler.py  the runner's source of trials for a tuned sweep; pruning; final trials per cell

What a tuned sweep asks for so far (read-only, for `plan`, `status`, `sync` and the report) is
`orchestrator.plan.tuned_trials`.
"""
