"""Certified defences, one package each, all behind the protocol in ``methods.base``.

Importing this package imports every sub-package, and each registers its methods with
``@methods.base.register``; the harness then lists them with ``methods.base.list_methods()``.
"""

import importlib
import pkgutil

for _info in pkgutil.iter_modules(__path__):
    if _info.ispkg:
        importlib.import_module(f"{__name__}.{_info.name}")
