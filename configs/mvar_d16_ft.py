"""Old name of ``configs/mvar_ft.py:d16``, kept so that existing scripts run."""

import functools
import warnings

from configs import mvar_ft

warnings.warn("renamed: --config configs/mvar_ft.py:d16", FutureWarning, stacklevel=2)
get_config = functools.partial(mvar_ft.get_config, "d16")
