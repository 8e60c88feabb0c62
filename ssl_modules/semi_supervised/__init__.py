"""Semi-supervised methods: learn from a few labeled and many unlabeled images.

- ``SelfTrainingModule``: pseudo-labels, in rounds or online, with top-k / all / weighted selection.
- ``StudentTeacherModule``: knowledge distillation, Mean Teacher (EMA teacher), Noisy Student.
- ``FixMatchModule``: weak-view pseudo-labels taught on strong views, kept and weighted by a
  pseudo-label rule (``rules``: FixMatch's fixed threshold, FlexMatch, FreeMatch, SoftMatch, UDA).
- ``MixMatchModule``: sharpened guesses over K weak views, MixUp of labeled and unlabeled.

The first three take ``entropy_weight`` for entropy minimisation on the unlabeled predictions.
"""

from ssl_modules.semi_supervised.fixmatch import FixMatchModule
from ssl_modules.semi_supervised.mixmatch import MixMatchModule
from ssl_modules.semi_supervised.self_training import SelfTrainingModule
from ssl_modules.semi_supervised.student_teacher import StudentTeacherModule

__all__ = ["FixMatchModule", "MixMatchModule", "SelfTrainingModule", "StudentTeacherModule"]
