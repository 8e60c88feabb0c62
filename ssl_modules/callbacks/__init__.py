"""Visual logging (W&B first) shared by the methods."""

from ssl_modules.callbacks.visuals import log_image_grid

__all__ = ["log_image_grid"]
