"""The driver side of a run: the loops and the evaluation that call the actors.

`orchestrator.py` (the MO-ODPO loop, top to bottom) runs on `online_loop`'s machinery; the
command-line scripts at the repository root (`offline.py`, `evaluate.py`, `export.py`) run
`offline_loop`, `pareto_eval` and `export_checkpoint`. Everything here may import Ray and the
actors (`actors/`); what is pure lives in `moalign/`, which imports neither.
"""
