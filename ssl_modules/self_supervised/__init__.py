"""Self-supervised methods, one file each: pretext tasks and contrastive / joint-embedding."""

from ssl_modules.self_supervised.barlow_twins import BarlowTwinsModule
from ssl_modules.self_supervised.byol import BYOLModule
from ssl_modules.self_supervised.colorization import ColorizationPretext
from ssl_modules.self_supervised.denoising_autoencoder import DenoisingAutoencoder
from ssl_modules.self_supervised.dino import DINOModule
from ssl_modules.self_supervised.jigsaw import JigsawPretext
from ssl_modules.self_supervised.joint_embedding import JointEmbeddingLoss, JointEmbeddingModule
from ssl_modules.self_supervised.mae import MAEModule
from ssl_modules.self_supervised.moco import MoCoModule
from ssl_modules.self_supervised.rotation import RotationPretext
from ssl_modules.self_supervised.simclr import SimCLRModule
from ssl_modules.self_supervised.simsiam import SimSiamModule
from ssl_modules.self_supervised.swav import SwAVModule
from ssl_modules.self_supervised.vicreg import VICRegModule

__all__ = [
    "ColorizationPretext",
    "DenoisingAutoencoder",
    "JigsawPretext",
    "RotationPretext",
    "SimCLRModule",
    "MoCoModule",
    "BYOLModule",
    "BarlowTwinsModule",
    "VICRegModule",
    "SimSiamModule",
    "MAEModule",
    "DINOModule",
    "SwAVModule",
    "JointEmbeddingModule",
    "JointEmbeddingLoss",
]
