"""torchtitan_like: PyTorch-native pretraining of Llama-style models, from one CPU to many GPUs.

The subpackages `models`, `parallelisms` and `kernels` live at the repository's top level (the
product's layout) and are installed as `torchtitan_like.models` and so on (see pyproject.toml).
When the package is imported from a source checkout without installation, the fallback below finds
them beside this folder.
"""

import os as _os

__version__ = "0.1.0"

_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if not _os.path.isdir(_os.path.join(_os.path.dirname(_os.path.abspath(__file__)), "models")) and \
        _os.path.isfile(_os.path.join(_root, "models", "__init__.py")):
    __path__.append(_root)  # noqa: F821 - module __path__ of a package
