"""Optimizers and schedules: SGD with coupled (PyTorch-style) weight decay, LARS, Keras Lamb; warmup + cosine.

Weight decay here is L2 added to the gradient before momentum, as in the papers' PyTorch code (Keras's own
``weight_decay`` is decoupled). Its scope is ``train.wd_exclude``: ``[bn, bias]`` (the default; SimCLR, WCL and
ReSSL's ImageNet code) leaves BatchNorm γ/β and biases undecayed and, in LARS, without trust-ratio adaptation (You
et al. 2017); ``[]`` decays every variable (ReSSL's small-dataset code and CsMl: ``SGD(model.parameters(), …)``).
"""
from __future__ import annotations

import math

import keras
from keras import ops


WD_EXCLUDE = ("bn", "bias")


def excluded(variable, exclude=WD_EXCLUDE):
    """Whether ``variable`` is left out of weight decay (and LARS's adaptation): ``exclude`` names the kinds, ``bn``
    (BatchNorm γ and β, by variable name) and ``bias`` (biases)."""
    name = (getattr(variable, "path", None) or variable.name).rsplit("/", 1)[-1].split(":")[0]
    kind = "bn" if name in ("gamma", "beta") else "bias" if name == "bias" else None
    return kind is not None and kind in exclude


@keras.saving.register_keras_serializable(package="tfssl")
class SGD(keras.optimizers.Optimizer):
    """v ← μ·v + g + wd·θ; θ ← θ − lr·v (or Nesterov). ``weight_decay`` skips the kinds in ``wd_exclude``."""

    def __init__(self, learning_rate=0.1, momentum=0.9, weight_decay=0.0, nesterov=False, name="sgd",
                 wd_exclude=WD_EXCLUDE, **kw):
        super().__init__(learning_rate=learning_rate, name=name, **kw)
        self.momentum, self.l2, self.nesterov = momentum, weight_decay, nesterov
        self.wd_exclude = tuple(wd_exclude)

    def build(self, variables):
        if self.built:
            return
        super().build(variables)
        self.velocities = [self.add_variable_from_reference(v, "velocity") for v in variables]
        # the scope is decided here, on the Keras variables: under a strategy update_step sees each replica's
        # component, whose name ("gamma/replica_1:0") no longer tells what the variable is
        self._decayed = [not excluded(v, self.wd_exclude) for v in variables]

    def _is_decayed(self, variable):
        return self._decayed[self._get_variable_index(variable)]

    def _direction(self, gradient, variable, lr):
        """The step before the learning rate; LARS rescales it."""
        if self.l2 and self._is_decayed(variable):
            gradient = gradient + self.l2 * variable
        return gradient

    def update_step(self, gradient, variable, learning_rate):
        lr = ops.cast(learning_rate, variable.dtype)
        d = self._direction(ops.cast(gradient, variable.dtype), variable, lr)
        v = self.velocities[self._get_variable_index(variable)]
        self.assign(v, self.momentum * v + d)
        step = d + self.momentum * v if self.nesterov else v
        self.assign_sub(variable, lr * step)

    def get_config(self):
        return {**super().get_config(), "momentum": self.momentum, "weight_decay": self.l2, "nesterov": self.nesterov,
                "wd_exclude": list(self.wd_exclude)}


@keras.saving.register_keras_serializable(package="tfssl")
class LARS(SGD):
    """LARS (You et al. 2017): the decayed gradient is scaled by η·‖θ‖/‖g + wd·θ‖ before momentum (rank>1 only)."""

    def __init__(self, learning_rate=0.1, momentum=0.9, weight_decay=1e-6, trust_coefficient=0.001, name="lars",
                 wd_exclude=WD_EXCLUDE, **kw):
        super().__init__(learning_rate, momentum, weight_decay, name=name, wd_exclude=wd_exclude, **kw)
        self.trust_coefficient = trust_coefficient

    def _direction(self, gradient, variable, lr):
        d = super()._direction(gradient, variable, lr)
        if not self._is_decayed(variable):
            return d
        w_norm, d_norm = ops.norm(ops.reshape(variable, [-1])), ops.norm(ops.reshape(d, [-1]))
        trust = ops.where((w_norm > 0) & (d_norm > 0), self.trust_coefficient * w_norm / d_norm, 1.0)
        return d * trust

    def get_config(self):
        return {**super().get_config(), "trust_coefficient": self.trust_coefficient}


@keras.saving.register_keras_serializable(package="tfssl")
class WarmupCosine(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warm-up from 0 to ``base`` over ``warmup_steps``, then cosine decay to ``final`` at ``total_steps``."""

    def __init__(self, base, total_steps, warmup_steps=0, final=0.0):
        self.base, self.total, self.warmup, self.final = float(base), int(total_steps), int(warmup_steps), final

    def __call__(self, step):
        step = ops.cast(step, "float32")
        warm = self.base * (step + 1.0) / max(1, self.warmup)
        progress = ops.clip((step - self.warmup) / max(1, self.total - self.warmup), 0.0, 1.0)
        cos = self.final + (self.base - self.final) * 0.5 * (1.0 + ops.cos(math.pi * progress))
        return ops.where(step < self.warmup, warm, cos)

    def get_config(self):
        return {"base": self.base, "total_steps": self.total, "warmup_steps": self.warmup, "final": self.final}


def scaled_lr(lr, batch_size, rule):
    """The recipe's learning-rate rule: linear lr·B/256, sqrt lr·√B, or none."""
    return {"linear": lr * batch_size / 256.0, "sqrt": lr * math.sqrt(batch_size), "none": lr}[rule]


def build_optimizer(train_cfg, total_steps, steps_per_epoch):
    """The optimizer named by ``train.optimizer`` with the scaled lr under warmup + cosine."""
    lr = WarmupCosine(scaled_lr(train_cfg.lr, train_cfg.batch_size, train_cfg.lr_scaling), total_steps,
                      int(round(train_cfg.warmup_epochs * steps_per_epoch)))
    exclude = tuple(train_cfg.wd_exclude)
    if train_cfg.optimizer == "sgd":
        return SGD(lr, train_cfg.momentum, train_cfg.weight_decay, wd_exclude=exclude)
    if train_cfg.optimizer == "lars":
        return LARS(lr, train_cfg.momentum, train_cfg.weight_decay, wd_exclude=exclude)
    if train_cfg.optimizer == "lamb":
        opt = keras.optimizers.Lamb(lr, weight_decay=train_cfg.weight_decay or None)
        opt.tfssl_wd_exclude = exclude           # the method's compile exempts these kinds (Keras decays all)
        return opt
    raise ValueError(f"train.optimizer={train_cfg.optimizer!r} is not one of sgd, lars, lamb")


class SkipNonFinite(keras.optimizers.LossScaleOptimizer):
    """``train.on_nan: skip``: the inner optimizer's update is applied only when every gradient is finite; a
    non-finite step leaves weights, slots and the step counter unchanged. Keras's LossScaleOptimizer does the
    distributed finite check and conditional apply; here the scale stays 1 (no loss scaling) and a skip only counts.

    Under a strategy each replica checks its own gradients, so the caller makes them agree first (the method sets
    every replica's gradients non-finite when any replica's are: :meth:`SSLMethod.agree_finite`).
    """

    def __init__(self, inner_optimizer, name=None, **kw):
        super().__init__(inner_optimizer, initial_scale=1.0, dynamic_growth_steps=2 ** 30,
                         name=name or f"skip_{inner_optimizer.name}", **kw)

    def _stateful_handle_finite_grads(self, grads, trainable_variables):
        self.inner_optimizer.apply(grads, trainable_variables=trainable_variables)

    def _stateful_handle_non_finite_grads(self):
        self.step_counter.assign_add(1)

    @property
    def skipped(self):
        """Number of skipped updates so far."""
        return self.step_counter
