"""configs/sweeps/synth_table.py with a second fine-tuning learning rate (3e-4), chosen per group on validation.

  python -m launch.sweep --sweep=configs/sweeps/synth_table_lr.py --workdir=/tmp/avt_synth_table

In the workdir of a finished synth_table sweep only the 12 new runs execute (about 8-10 minutes on 2 CPU cores);
results.md then reports, per label fraction and init, the learning rate with the better mean validation accuracy.
"""

import importlib.util
import os

_spec = importlib.util.spec_from_file_location("_synth_table", os.path.join(os.path.dirname(__file__),
                                                                           "synth_table.py"))
_base = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_base)


def get_sweep():
  sweep = _base.get_sweep()
  sweep["name"] = sweep["name"].replace("pretrained vs scratch", "pretrained vs scratch, lr chosen on validation")
  sweep["lrs"] = (1e-3, 3e-4)
  return sweep
