"""ssl-modules: PyTorch Lightning modules for learning from unlabeled data.

``__all__`` lists the public LightningModules; the conformance tests walk it. ``load_backbone``
(the backbone of any checkpoint, with the weights its method evaluates with) is exported too;
the rest of that API is in ``ssl_modules.export``.
"""

from ssl_modules.export import load_backbone as load_backbone
from ssl_modules.self_supervised.barlow_twins import BarlowTwinsModule
from ssl_modules.self_supervised.byol import BYOLModule
from ssl_modules.self_supervised.colorization import ColorizationPretext
from ssl_modules.self_supervised.denoising_autoencoder import DenoisingAutoencoder
from ssl_modules.self_supervised.dino import DINOModule
from ssl_modules.self_supervised.jigsaw import JigsawPretext
from ssl_modules.self_supervised.mae import MAEModule
from ssl_modules.self_supervised.moco import MoCoModule
from ssl_modules.self_supervised.rotation import RotationPretext
from ssl_modules.self_supervised.simclr import SimCLRModule
from ssl_modules.self_supervised.simsiam import SimSiamModule
from ssl_modules.self_supervised.swav import SwAVModule
from ssl_modules.self_supervised.vicreg import VICRegModule
from ssl_modules.semi_supervised import (
    FixMatchModule,
    MixMatchModule,
    SelfTrainingModule,
    StudentTeacherModule,
)
from ssl_modules.supervised import SupervisedModule

__all__ = [
    "SupervisedModule",
    "SelfTrainingModule",
    "StudentTeacherModule",
    "FixMatchModule",
    "MixMatchModule",
    "RotationPretext",
    "JigsawPretext",
    "ColorizationPretext",
    "DenoisingAutoencoder",
    "SimCLRModule",
    "MoCoModule",
    "BYOLModule",
    "BarlowTwinsModule",
    "VICRegModule",
    "SimSiamModule",
    "MAEModule",
    "DINOModule",
    "SwAVModule",
]
