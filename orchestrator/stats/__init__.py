"""The statistics of a sweep's design, shared by `plan` and the report:

    design.py  which cells are compared with which (one owner of the comparison structure)
    power.py   the paired t test's power: detectable effects, seeds needed, the pooled paired SD

Nothing here imports `plan` or the report (both import this), so either can use it without a cycle.
"""
