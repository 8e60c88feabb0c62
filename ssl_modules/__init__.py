"""ssl-modules: PyTorch Lightning modules for learning from unlabeled data.

``__all__`` lists the public LightningModules; the conformance tests walk it.
"""

from ssl_modules.supervised import SupervisedModule

__all__ = [
    "SupervisedModule",
]
