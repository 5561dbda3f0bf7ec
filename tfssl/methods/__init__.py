"""Self-supervised methods, one file each; :data:`METHODS` maps a recipe's ``method.name`` to its class."""
import dataclasses

from tfssl import config
from tfssl.methods.base import SSLMethod
from tfssl.methods.csml import CsMl
from tfssl.methods.mocov2 import MoCoV2
from tfssl.methods.ressl import ReSSL
from tfssl.methods.simclr import SimCLR
from tfssl.methods.wcl import WCL

METHODS = {cls.method_name: cls for cls in (ReSSL, SimCLR, MoCoV2, WCL, CsMl)}
for _cls in METHODS.values():               # the recipe schema learns each method's keys from here
    config.register_method(_cls.method_name, _cls.Params)


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
    try:
        made = views.from_config(cfg.augment, cls.view_recipes, small_sizes=sizes or None,
                                 small_scales=scales or None, warmup_recipes=cls.warmup_view_recipes,
                                 warmup_steps=warmup_steps)
    except ValueError as e:
        raise config.ConfigError(str(e)) from None
    if cfg.augment.extra:                    # a foreign layer that cannot run in a tf.data graph: say so now
        _check_extra_in_graph(made, cfg)
    return made


def _check_extra_in_graph(made, cfg):
    import tensorflow as tf
    side, channels = cfg.augment.size, cfg.data.channels
    probe = tf.zeros([2, side, side, channels], tf.uint8)
    try:
        tf.function(lambda x: made(x, seed=tf.constant([0, 0], tf.int64)))(probe)
    except Exception as e:
        line = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise config.ConfigError(f"augment.extra: the views fail on a uint8 [2, {side}, {side}, {channels}] batch "
                                 f"in a TensorFlow graph (the tf.data placement): {type(e).__name__}: {line}; "
                                 f"check the layer's args (value_range [0, 1]: views are float images in [0, 1])") \
            from None


def build(cfg, num_classes=0, mean=(0.5,) * 3, std=(0.5,) * 3, total_steps=1, on_device_views=None,
          steps_per_epoch=None):
    """The method model of a :class:`tfssl.config.Config` (call under the strategy's scope)."""
    cls = METHODS[type(cfg.method).method_name]
    return cls(cfg.method, cfg.model, num_classes=num_classes, channels=cfg.data.channels, mean=mean, std=std,
               views=on_device_views, total_steps=total_steps, seed=cfg.train.seed, steps_per_epoch=steps_per_epoch,
               on_nan=cfg.train.on_nan, kernels=cfg.train.kernels, augment=dataclasses.asdict(cfg.augment))


__all__ = ["METHODS", "SSLMethod", "ReSSL", "SimCLR", "MoCoV2", "WCL", "CsMl", "build", "views_for"]
