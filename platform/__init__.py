"""scribeline.platform: the core that workers and flows import.

Installed only as ``scribeline.platform``. If this folder is ever imported as the
top-level module ``platform`` (Python started in the repository root puts the
current folder on ``sys.path``), it would shadow the standard library's
``platform`` module and break unrelated libraries. The guard below puts the
real standard-library module back in that case.
"""

if __name__ == "platform":  # pragma: no cover - only when run from the repo root
    import importlib.util
    import os
    import sys
    import sysconfig

    _path = os.path.join(sysconfig.get_paths()["stdlib"], "platform.py")
    _spec = importlib.util.spec_from_file_location("platform", _path)
    _stdlib_platform = importlib.util.module_from_spec(_spec)
    sys.modules["platform"] = _stdlib_platform
    _spec.loader.exec_module(_stdlib_platform)
