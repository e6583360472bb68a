"""Old name of ``configs/m_var.py:d20``, kept so that existing scripts run."""

import functools
import warnings

from configs import m_var

warnings.warn("renamed: --config configs/m_var.py:d20", FutureWarning, stacklevel=2)
get_config = functools.partial(m_var.get_config, "d20")
