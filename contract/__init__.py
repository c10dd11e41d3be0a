"""The bottom floor: what every layer shares and may import, importing none of them.

- `config`: the typed trial contract (`TrialSpec` and its parts, method settings, the flat
  Tune config and its digest);
- `schema`: the names of MLflow tags, params and metrics, and what a trial reports;
- `errors`: the error types every layer raises and the CLI turns into one line;
- `paths`: checks on the paths a user gives.
"""
