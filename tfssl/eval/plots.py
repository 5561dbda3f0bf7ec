"""Embedding plots: t-SNE scatter, nearest-neighbour retrieval grid, TensorBoard images and projector files.

Every file is written under a temporary name in its final directory and renamed into place (``os.replace``), so a
reader (or TensorBoard) never sees a half-written PNG or TSV. Figures use matplotlib's Agg canvas directly
(``matplotlib.figure.Figure``), never pyplot, so no GUI backend is touched and no global state changes.
"""
from __future__ import annotations

import contextlib
import math
import os

import numpy as np
import tensorflow as tf
from PIL import Image, ImageDraw

PCA_DIMS = 50           # t-SNE input is reduced to this many principal components first (scikit-learn advice)
SPRITE_MAX = 8192       # TensorBoard's projector rejects sprite sheets larger than 8192 × 8192 px


def _atomic(path, write):
    """Call ``write(tmp)`` on a hidden temporary file next to ``path``, then rename it to ``path``."""
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def subsample_indices(n, limit, seed=0):
    """Sorted indices of ``limit`` of ``n`` rows drawn without replacement (all rows when n ≤ limit or no limit)."""
    if not limit or n <= limit:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, int(limit), replace=False))


def _colours(num_classes):
    import matplotlib
    cmap = matplotlib.colormaps["tab10" if num_classes <= 10 else "tab20" if num_classes <= 20 else "turbo"]
    return [cmap(i if num_classes <= 20 else i / max(1, num_classes - 1)) for i in range(num_classes)]


def tsne_plot(features, labels, path, class_names=None, limit=2000, seed=0, perplexity=30.0, normalize=True,
              title=None, size=(7.0, 7.0), dpi=100, threads=None):
    """t-SNE (scikit-learn) of embeddings coloured by class, saved as a PNG. Returns (path, coords [n, 2]).

    At most ``limit`` rows are used, chosen by :func:`subsample_indices` ``(len(features), limit, seed)`` (coords
    row i is that selection's row i). Rows are L2-normalised first when ``normalize`` (the cosine geometry kNN
    uses), reduced to 50 principal components when D > 50, then embedded with ``TSNE(init="pca",
    learning_rate="auto", perplexity=min(perplexity, (n − 1)/3))``. Labels < 0 (unlabelled) are drawn grey; a
    legend is drawn for ≤ 20 classes. The PNG is ``size · dpi`` pixels.

    ``threads`` caps the OpenMP threads of scikit-learn's Barnes-Hut gradient (None: its default, all cores). On a
    shared, busy machine the default can be ~10× slower than ``threads=1`` (spinning threads oversubscribe the CPU).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE
    from threadpoolctl import threadpool_limits

    features = np.asarray(features, np.float32)
    if features.ndim != 2 or len(features) < 4:
        raise ValueError(f"t-SNE needs at least 4 embeddings as an [N, D] matrix, got shape {features.shape}")
    labels = np.full(len(features), -1) if labels is None else np.asarray(labels).astype(np.int64)
    idx = subsample_indices(len(features), limit, seed)
    x, y = features[idx], labels[idx]
    if normalize:
        x = x / np.sqrt(np.maximum(np.sum(x * x, axis=1, keepdims=True), 1e-12))
    if x.shape[1] > PCA_DIMS:
        x = PCA(n_components=min(PCA_DIMS, len(x)), random_state=seed).fit_transform(x)
    tsne = TSNE(n_components=2, perplexity=min(float(perplexity), (len(x) - 1) / 3.0), init="pca",
                learning_rate="auto", random_state=seed)
    with threadpool_limits(limits=threads) if threads else contextlib.nullcontext():
        coords = tsne.fit_transform(x).astype(np.float32)

    fig = Figure(figsize=size, dpi=dpi)
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0.02, 0.02, 0.96, 0.92 if title is not False else 0.96))
    classes = sorted(int(c) for c in np.unique(y) if c >= 0)
    num = max(classes) + 1 if classes else 0
    if class_names is not None:
        num = max(num, len(class_names))
    colours = _colours(max(num, 1))
    marker = max(2.0, 12.0 - len(x) / 300.0)
    if np.any(y < 0):
        ax.scatter(coords[y < 0, 0], coords[y < 0, 1], s=marker, color="0.6", label="unlabelled", linewidths=0)
    for c in classes:
        name = class_names[c] if class_names is not None and c < len(class_names) else str(c)
        ax.scatter(coords[y == c, 0], coords[y == c, 1], s=marker, color=colours[c], label=name, linewidths=0)
    if 0 < len(classes) <= 20:
        ax.legend(loc="best", fontsize=7, markerscale=2.0, framealpha=0.8)
    ax.set_xticks([])
    ax.set_yticks([])
    if title is not False:
        reduced = f" (PCA {x.shape[1]})" if x.shape[1] < features.shape[1] else ""
        fig.suptitle(title or f"t-SNE of {len(x)} embeddings{reduced}", fontsize=10)
    path = _atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=dpi))
    return path, coords


def nearest_neighbours(bank_features, query_features, k=8, exclude_self=False, chunk=1024):
    """Indices [Q, k] of each query's k most cosine-similar bank rows, most similar first (ties: lower index).

    ``exclude_self``: the queries are the bank's first Q rows (query i is bank row i), so bank row i is never a
    neighbour of query i.
    """
    bank = tf.math.l2_normalize(tf.constant(np.asarray(bank_features), tf.float32), axis=1)
    queries = np.asarray(query_features)
    n = int(bank.shape[0])
    if exclude_self and len(queries) > n:
        raise ValueError(f"exclude_self needs the queries to be the bank's first rows, got {len(queries)} queries "
                         f"for a bank of {n}")
    k = min(int(k), n - (1 if exclude_self else 0))
    out = []
    for start in range(0, len(queries), chunk):
        q = tf.math.l2_normalize(tf.constant(queries[start:start + chunk], tf.float32), axis=1)
        sims = tf.matmul(q, bank, transpose_b=True)
        if exclude_self:
            own = tf.one_hot(tf.range(start, start + int(q.shape[0])), n, on_value=True, off_value=False)
            sims = tf.where(own, tf.constant(-np.inf, tf.float32), sims)
        out.append(tf.math.top_k(sims, k=k).indices.numpy())
    return np.concatenate(out).astype(np.int64) if out else np.zeros((0, k), np.int64)


def _rgb(image):
    """RGB PIL image of an array: uint8, or float in [0, 1]; [H, W], [H, W, 1] or [H, W, 3]."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        image = np.clip(np.round(image.astype(np.float32) * 255.0), 0, 255).astype(np.uint8)
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    return Image.fromarray(image).convert("RGB")


def _resized(image, size):
    """``image`` (PIL) resized to ``size`` (width, height): nearest when enlarging (crisp pixels), else bilinear."""
    enlarging = size[0] >= image.size[0] and size[1] >= image.size[1]
    return image.resize(size, Image.NEAREST if enlarging else Image.BILINEAR)


def _tile(image, cell):
    return _resized(_rgb(image), (cell, cell))


def retrieval_grid(query_images, bank_images, bank_features, query_features, path, k=8, exclude_self=False,
                   query_labels=None, bank_labels=None, cell=64, gap=2, separator=10):
    """A PNG grid, one row per query: the query, then its top-k cosine neighbours in the bank. Returns (path, idx).

    ``idx`` [Q, k] is :func:`nearest_neighbours` (``exclude_self`` when the queries are the bank's first rows).
    With both label arrays, each neighbour gets a green (same class as the query) or red frame. The image is
    ``cell·(k+1) + gap·(k−1) + separator`` wide and ``cell·Q + gap·(Q−1)`` high.
    """
    idx = nearest_neighbours(bank_features, query_features, k, exclude_self)
    rows, k = idx.shape
    if len(query_images) != rows:
        raise ValueError(f"{len(query_images)} query images for {rows} query features")
    width = cell * (k + 1) + gap * max(0, k - 1) + separator
    height = cell * rows + gap * max(0, rows - 1)
    grid = Image.new("RGB", (width, max(1, height)), "white")
    draw = ImageDraw.Draw(grid)
    framed = query_labels is not None and bank_labels is not None
    for r in range(rows):
        top = r * (cell + gap)
        grid.paste(_tile(query_images[r], cell), (0, top))
        for j, b in enumerate(idx[r]):
            left = cell + separator + j * (cell + gap)
            grid.paste(_tile(bank_images[int(b)], cell), (left, top))
            if framed:
                same = int(np.asarray(bank_labels)[b]) == int(np.asarray(query_labels)[r])
                draw.rectangle((left, top, left + cell - 1, top + cell - 1),
                               outline=(40, 170, 60) if same else (220, 40, 40), width=max(1, cell // 24))
    path = _atomic(path, lambda tmp: grid.save(tmp, format="PNG"))
    return path, idx


def log_images_to_tensorboard(logdir, name, png_paths, step=0):
    """Write PNG files as ``tf.summary.image`` summaries to an event file in ``logdir``. Returns the tags.

    One path is logged under ``name``; several under ``name/<file stem>``.
    """
    paths = [png_paths] if isinstance(png_paths, (str, os.PathLike)) else list(png_paths)
    writer = tf.summary.create_file_writer(str(logdir))
    tags, seen = [], set()
    try:
        with writer.as_default():
            for p in paths:
                tag = name if len(paths) == 1 else f"{name}/{os.path.splitext(os.path.basename(p))[0]}"
                while tag in seen:
                    tag += "_"
                seen.add(tag)
                image = tf.io.decode_png(tf.io.read_file(str(p)))
                tf.summary.image(tag, image[None], step=step)
                tags.append(tag)
        writer.flush()
    finally:
        writer.close()
    return tags


def _metadata_cell(value):
    return str(value).replace("\t", " ").replace("\n", " ").replace("\r", " ")


def _sprite(images):
    """A square sprite sheet of the images (row-major, ≤ 8192 px a side) and the thumbnail (height, width)."""
    count = len(images)
    side = int(math.ceil(math.sqrt(count)))
    first = np.asarray(images[0])
    h, w = first.shape[:2]
    scale = min(1.0, SPRITE_MAX / (side * max(h, w)))
    th, tw = max(1, int(h * scale)), max(1, int(w * scale))
    sheet = Image.new("RGB", (side * tw, side * th), "black")
    for i in range(count):
        sheet.paste(_resized(_rgb(images[i]), (tw, th)), ((i % side) * tw, (i // side) * th))
    return sheet, (th, tw)


def write_projector(logdir, features, labels=None, sprite_images=None, class_names=None, tensor_name="embedding"):
    """TensorBoard embedding-projector files in ``logdir``. Returns {kind: path}.

    ``tensors.tsv`` (N rows of D tab-separated floats), ``metadata.tsv`` (the label of each row, one column without
    header; with ``class_names`` a ``label<TAB>class`` header and two columns), optionally ``sprite.png`` (a square
    sheet of the images, row-major, ≤ 8192 px a side) and ``projector_config.pbtxt`` naming them with paths
    relative to ``logdir`` — the layout TensorBoard's projector reads from a log directory (or a run directory).
    The config is written last, each file via a temporary name, so the projector never reads a partial set.
    """
    from google.protobuf import text_format
    from tensorboard.plugins.projector import ProjectorConfig

    features = np.asarray(features, np.float32)
    if features.ndim != 2:
        raise ValueError(f"features must be [N, D], got shape {features.shape}")
    n = len(features)
    os.makedirs(logdir, exist_ok=True)
    config = ProjectorConfig()
    embedding = config.embeddings.add()
    embedding.tensor_name = tensor_name
    embedding.tensor_path = "tensors.tsv"
    embedding.tensor_shape.extend(features.shape)
    paths = {"tensors": _atomic(os.path.join(logdir, "tensors.tsv"),
                                lambda tmp: np.savetxt(tmp, features, fmt="%.7g", delimiter="\t"))}
    if labels is not None:
        labels = np.asarray(labels)
        if len(labels) != n:
            raise ValueError(f"{len(labels)} labels for {n} feature rows")

        def metadata(tmp):
            with open(tmp, "w", encoding="utf-8") as f:
                if class_names is not None:
                    f.write("label\tclass\n")
                for y in labels:
                    name = class_names[int(y)] if class_names is not None and 0 <= int(y) < len(class_names) else ""
                    f.write(f"{_metadata_cell(y)}\t{_metadata_cell(name)}\n" if class_names is not None
                            else f"{_metadata_cell(y)}\n")
        paths["metadata"] = _atomic(os.path.join(logdir, "metadata.tsv"), metadata)
        embedding.metadata_path = "metadata.tsv"
    if sprite_images is not None:
        if len(sprite_images) != n:
            raise ValueError(f"{len(sprite_images)} sprite images for {n} feature rows")
        sheet, (th, tw) = _sprite(sprite_images)
        paths["sprite"] = _atomic(os.path.join(logdir, "sprite.png"), lambda tmp: sheet.save(tmp, format="PNG"))
        embedding.sprite.image_path = "sprite.png"
        embedding.sprite.single_image_dim.extend([tw, th])       # TensorBoard reads [width, height]

    def write_config(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text_format.MessageToString(config))
    paths["config"] = _atomic(os.path.join(logdir, "projector_config.pbtxt"), write_config)
    return paths
