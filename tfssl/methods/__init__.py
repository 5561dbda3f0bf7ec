"""Self-supervised methods, one file each; :data:`METHODS` maps a recipe's ``method.name`` to its class."""
from tfssl.methods.base import SSLMethod
from tfssl.methods.csml import CsMl
from tfssl.methods.mocov2 import MoCoV2
from tfssl.methods.ressl import ReSSL
from tfssl.methods.simclr import SimCLR
from tfssl.methods.wcl import WCL

METHODS = {cls.method_name: cls for cls in (ReSSL, SimCLR, MoCoV2, WCL, CsMl)}


def views_for(cfg, steps_per_epoch=None):
    """The :class:`tfssl.views.Views` of the recipe's method (large views + the method's or generic small crops).

    A method with a view schedule (``warmup_view_recipes``, e.g. WCL) uses its warm-up recipes for the first
    ``method.view_warmup_epochs × steps_per_epoch`` steps; without ``steps_per_epoch`` only the main recipes are
    built (previews).
    """
    from tfssl import views
    cls = METHODS[type(cfg.method).method_name]
    sizes, scales = cls.small_crops(cfg.method, cfg.augment.size)
    warmup_steps = 0
    if cls.warmup_view_recipes and steps_per_epoch:
        warmup_steps = int(round(getattr(cfg.method, "view_warmup_epochs", 0) * steps_per_epoch))
    return views.from_config(cfg.augment, cls.view_recipes, small_sizes=sizes or None, small_scales=scales or None,
                             warmup_recipes=cls.warmup_view_recipes, warmup_steps=warmup_steps)


def build(cfg, num_classes=0, mean=(0.5,) * 3, std=(0.5,) * 3, total_steps=1, on_device_views=None,
          steps_per_epoch=None):
    """The method model of a :class:`tfssl.config.Config` (call under the strategy's scope)."""
    cls = METHODS[type(cfg.method).method_name]
    return cls(cfg.method, cfg.model, num_classes=num_classes, channels=cfg.data.channels, mean=mean, std=std,
               views=on_device_views, total_steps=total_steps, seed=cfg.train.seed, steps_per_epoch=steps_per_epoch,
               on_nan=cfg.train.on_nan, kernels=cfg.train.kernels)


__all__ = ["METHODS", "SSLMethod", "ReSSL", "SimCLR", "MoCoV2", "WCL", "CsMl", "build", "views_for"]
