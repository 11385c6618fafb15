"""Former home of ``ckdiff convert``: the conversions now live in ``converters/api.py`` and the command in
``ckdiff/commands/convert.py``. Kept so that old imports (``read_source``) keep working."""
from .api import CONVERTERS, read_source  # noqa: F401
from .layouts import convert  # noqa: F401
