"""The config of one run of a sweep: a base config file plus the overrides stored in the run's run.json.

  python -m avt_jax.main --config=configs/sweeps/run.py:<run dir>/run.json --workdir=<run dir>

`python -m launch.sweep` writes run.json ({"config": "<file>[:variant]", "overrides": {dotted key: value}}) and
prints or runs this command; lists in run.json become tuples in the config.
"""

from launch import sweep


def get_config(arg: str = ""):
  if not arg:
    raise ValueError("configs/sweeps/run.py needs the run spec: --config=configs/sweeps/run.py:<run dir>/run.json")
  return sweep.build_config(arg)
