"""The bottom floor: what every layer shares and may import, importing none of them.

- `config`: the typed trial contract (`TrialSpec` and its parts, the flat Tune config and its
  digest), each method's settings taken from the method files (`methods/`, on this floor too);
- `train`: how a model is optimised (`TrainSpec`);
- `fields`: how a settings dataclass names its flat keys, and the checks its fields share;
- `schema`: the names of MLflow tags, params and metrics, and what a trial reports;
- `errors`: the error types every layer raises and the CLI turns into one line;
- `paths`: checks on the paths a user gives.
"""
