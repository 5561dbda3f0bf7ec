"""Semi-supervised evaluation: fine-tune the whole backbone and a linear head on a stratified label fraction
(METHODS.md, "Evaluation protocols"; SimCLR/WCL report 1% and 10% of ImageNet).

All layers train, BatchNorm in training mode, crop + flip augmentation on every batch; the backbone's learning rate
is a fraction of the head's (SimCLR fine-tunes with one lr and no head warm-up; tfssl separates them as the issue
asks, defaults ``backbone_lr = head_lr / 10``). SGD with momentum and cosine decay per step; weight decay on
kernels only. Reported on the held-out split after the last epoch (no test-set selection).
"""
from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from tfssl.data import label_fraction
from tfssl.optim import SGD, WarmupCosine


def labelled_subset(dataset, fraction, seed=0, with_rest=False):
    """(images uint8 [n,...], labels [n]) of a stratified ``fraction`` of a {"image","label"} dataset (seeded).

    ``with_rest``: also return (images, labels) of every other labelled image (the "unlabelled" pool; its labels
    are only for measuring pseudo-label accuracy)."""
    images, labels = [], []
    for batch in dataset.batch(4096):
        images.append(batch["image"].numpy())
        labels.append(batch["label"].numpy())
    images, labels = np.concatenate(images), np.concatenate(labels)
    keep = labels >= 0
    images, labels = images[keep], labels[keep]
    idx = label_fraction(labels, fraction, seed)
    if not with_rest:
        return images[idx], labels[idx]
    rest = np.setdiff1d(np.arange(len(labels)), idx)
    return images[idx], labels[idx], images[rest], labels[rest]


def finetune(backbone, images, labels, test_ds, num_classes, augment=None, epochs=30, batch_size=256,
             head_lr=0.1, backbone_lr=None, weight_decay=5e-4, momentum=0.9, seed=0, log=None,
             return_predictor=False):
    """Fine-tune a *copy* of ``backbone`` plus a Dense head on (images uint8, labels); returns test top-1/top-5.

    ``return_predictor``: return ``(result, predict)`` where ``predict(uint8 images) → class probabilities``
    (numpy, inference mode) uses the fine-tuned network.
    ``augment``: a layer mapping float images in [0,1] to augmented ones (e.g. ``tfssl.views.view("weak", …)``:
    random resized crop + flip), or None. ``test_ds`` yields (float images in [0,1], labels) batches.
    """
    if len(images) != len(labels) or not len(images):
        raise ValueError(f"fine-tuning needs as many labels as images and at least one ({len(images)} images, "
                         f"{len(labels)} labels)")
    keras.utils.set_random_seed(seed)
    net = keras.models.clone_model(backbone)
    net.set_weights(backbone.get_weights())
    head = keras.layers.Dense(num_classes, name="finetune_head")
    head.build((None, net.outputs[0].shape[-1]))
    steps = max(1, int(np.ceil(len(images) / batch_size))) * epochs
    backbone_lr = head_lr / 10.0 if backbone_lr is None else backbone_lr
    opt_b = SGD(WarmupCosine(backbone_lr, steps), momentum, weight_decay, name="finetune_backbone")
    opt_h = SGD(WarmupCosine(head_lr, steps), momentum, weight_decay, name="finetune_head_sgd")
    opt_b.build(net.trainable_variables)
    opt_h.build(head.trainable_variables)

    @tf.function
    def step(x, y):
        x = tf.cast(x, tf.float32) / 255.0
        if augment is not None:
            x = augment(x)
        with tf.GradientTape() as tape:
            logits = head(net(x, training=True))
            loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(tf.cast(y, tf.int32), logits))
        grads = tape.gradient(loss, net.trainable_variables + head.trainable_variables)
        n = len(net.trainable_variables)
        if n:                          # the raw-pixel baseline has no backbone weights
            opt_b.apply_gradients(zip(grads[:n], net.trainable_variables))
        opt_h.apply_gradients(zip(grads[n:], head.trainable_variables))
        return loss

    ds = tf.data.Dataset.from_tensor_slices((images, labels)).shuffle(len(images), seed=seed,
                                                                      reshuffle_each_iteration=True)
    ds = ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)
    for epoch in range(epochs):
        losses = [float(step(x, y)) for x, y in ds]
        if log:
            log(f"fine-tune epoch {epoch + 1}/{epochs}: loss {np.mean(losses):.4f}")
    predict = tf.function(lambda x: head(net(x, training=False)))
    hits1, hits5, count = 0, 0, 0
    for x, y in test_ds:
        top5 = tf.math.top_k(predict(x), k=min(5, num_classes)).indices.numpy()
        y = np.asarray(y)
        hits1 += int(np.sum(top5[:, 0] == y))
        hits5 += int(np.sum((top5 == y[:, None]).any(axis=1)))
        count += len(y)
    result = {"top1": hits1 / max(count, 1), "top5": hits5 / max(count, 1), "epochs": epochs,
              "labelled": int(len(images)), "head_lr": head_lr, "backbone_lr": backbone_lr,
              "weight_decay": weight_decay, "final_train_loss": float(np.mean(losses)) if epochs else None}
    if not return_predictor:
        return result

    def probabilities(uint8_images, chunk=1024):
        return np.concatenate([tf.nn.softmax(predict(tf.cast(uint8_images[i:i + chunk], tf.float32) / 255.0)).numpy()
                               for i in range(0, len(uint8_images), chunk)]) if len(uint8_images) else \
            np.zeros((0, num_classes), np.float32)
    return result, probabilities


def prediction_entropy(probabilities):
    """Shannon entropy (nats) of each row of class probabilities [N, C] → [N] (0·log 0 = 0)."""
    p = np.asarray(probabilities, np.float64)
    return -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0), axis=1)


def pseudo_label_finetune(backbone, images, labels, train_ds, test_ds, num_classes, fraction, entropy=0.5,
                          seed=0, log=None, **kw):
    """CsMl's semi-supervised protocol (METHODS.md CsMl 7): fine-tune on the labelled ``images``, predict the
    unlabelled rest of ``train_ds`` (every image outside the seeded ``fraction`` subset), keep the predictions whose
    entropy is below ``entropy`` nats as pseudo-labels, then fine-tune again — from the pretrained ``backbone``,
    not the first round's weights — on labelled + pseudo-labelled images. The true labels of the unlabelled images
    only measure ``pseudo_accuracy``; they never reach training. ``kw`` go to :func:`finetune` (both rounds)."""
    _, _, rest, rest_truth = labelled_subset(train_ds, fraction, seed, with_rest=True)
    first, predict = finetune(backbone, images, labels, test_ds, num_classes, seed=seed, log=log,
                              return_predictor=True, **kw)
    probs = predict(rest)
    keep = prediction_entropy(probs) < entropy
    pseudo = np.argmax(probs, axis=1)[keep]
    if log:
        log(f"pseudo-labels: {int(keep.sum())} of {len(rest)} unlabelled images below entropy {entropy}")
    second = finetune(backbone, np.concatenate([images, rest[keep]]), np.concatenate([labels, pseudo]), test_ds,
                      num_classes, seed=seed, log=log, **kw)
    return {**second, "first_round": {"top1": first["top1"], "top5": first["top5"]}, "entropy_threshold": entropy,
            "pseudo_labelled": int(keep.sum()), "unlabelled": int(len(rest)),
            "pseudo_accuracy": float(np.mean(pseudo == rest_truth[keep])) if keep.any() else None}
