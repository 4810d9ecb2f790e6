"""Our kernels, one wrapper module per op; backends chosen in `_dispatch`."""
from detailflow_engine.ops._dispatch import build_info, table  # noqa: F401
