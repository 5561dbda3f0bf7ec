"""Self-supervised methods, one file each; :data:`METHODS` maps a recipe's ``method.name`` to its class."""
from tfssl.methods.base import SSLMethod
from tfssl.methods.mocov2 import MoCoV2
from tfssl.methods.ressl import ReSSL
from tfssl.methods.simclr import SimCLR

METHODS = {cls.method_name: cls for cls in (ReSSL, SimCLR, MoCoV2)}


def views_for(cfg):
    """The :class:`tfssl.views.Views` of the recipe's method (large views + multi-crop small crops)."""
    from tfssl import views
    cls = METHODS[type(cfg.method).method_name]
    sizes = list(getattr(cfg.method, "crop_sizes", []) or [])
    scales = [(0.2 * s / cfg.augment.size, 1.0 * s / cfg.augment.size) for s in sizes] if sizes else None
    return views.from_config(cfg.augment, cls.view_recipes, small_sizes=sizes or None, small_scales=scales)


def build(cfg, num_classes=0, mean=(0.5,) * 3, std=(0.5,) * 3, total_steps=1, on_device_views=None):
    """The method model of a :class:`tfssl.config.Config` (call under the strategy's scope)."""
    cls = METHODS[type(cfg.method).method_name]
    return cls(cfg.method, cfg.model, num_classes=num_classes, channels=cfg.data.channels, mean=mean, std=std,
               views=on_device_views, total_steps=total_steps, seed=cfg.train.seed)


__all__ = ["METHODS", "SSLMethod", "ReSSL", "SimCLR", "MoCoV2", "build", "views_for"]
