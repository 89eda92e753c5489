"""The paper's experiments at a CPU scale: ``python -m training.run reproduce [--only NAME,...]``.

- ``experiments.py``: the experiments (fig2b, table3, table2, table5, appendixG, appendixEF, and
  the recipe search ``recipe``) as lists of entries, the bases and the training recipe;
- ``runner.py``: train and measure one entry, cached in the folder;
- ``store.py``: atomic JSON files and the folder's configuration check;
- ``claims.py``: the paper's claims and their verdicts, computed from the measurements;
- ``document.py``: ``reproduction.md`` and its figures;
- ``job.py``: the command.
"""
from .experiments import DEFAULT_EXPERIMENTS, EXPERIMENTS
from .job import reproduce, select

__all__ = ["reproduce", "select", "EXPERIMENTS", "DEFAULT_EXPERIMENTS"]
