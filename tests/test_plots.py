"""Embedding plots are real PNGs, the retrieval grid's neighbours equal a numpy brute force, TensorBoard reads the
image summaries and projector files, and nothing is left half-written."""
import os

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from tfssl.eval import plots
from tfssl.eval.plots import (log_images_to_tensorboard, nearest_neighbours, retrieval_grid, subsample_indices,
                              tsne_plot, write_projector)


def pixels(path):
    with Image.open(path) as im:
        assert im.format == "PNG"
        return np.asarray(im.convert("RGB"), np.float32)


def leftovers(directory):
    return [f for f in os.listdir(directory) if ".tmp" in f]


def clusters(n, d, k, seed=0, spread=6.0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    return (rng.standard_normal((k, d)) * spread)[y] + rng.standard_normal((n, d)), y


def brute_force(bank, queries, k, exclude_self=False):
    bank = bank / np.linalg.norm(bank, axis=1, keepdims=True)
    queries = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    sims = queries.astype(np.float64) @ bank.astype(np.float64).T
    if exclude_self:
        sims[np.arange(len(queries)), np.arange(len(queries))] = -np.inf
    return np.argsort(-sims, axis=1, kind="stable")[:, :k]


# ----------------------------------------------------------------------------- t-SNE
def test_tsne_plot_is_a_real_png_and_keeps_clusters(tmp_path):
    x, y = clusters(300, 64, 4)                                   # D > 50: PCA to 50 first
    path, coords = tsne_plot(x, y, tmp_path / "tsne.png", class_names=["a", "b", "c", "d"], threads=1)
    assert path == str(tmp_path / "tsne.png") and coords.shape == (300, 2) and np.all(np.isfinite(coords))
    image = pixels(path)
    assert image.shape == (700, 700, 3)                            # size · dpi, ratio 1
    assert image.std() > 10                                        # not blank
    assert len(np.unique(image.reshape(-1, 3), axis=0)) > 50      # points in several colours, legend, title
    d = np.linalg.norm(coords[:, None] - coords[None], axis=-1)     # well separated clusters stay separated
    np.fill_diagonal(d, np.inf)
    assert np.mean(y[np.argmin(d, axis=1)] == y) > 0.97
    assert leftovers(tmp_path) == []


def test_tsne_plot_subsamples_unlabelled_rows(tmp_path):
    x, _ = clusters(400, 8, 3, seed=1)
    path, coords = tsne_plot(x, None, tmp_path / "sub" / "tsne.png", limit=120, seed=3, size=(4, 3), threads=1,
                             title=False)
    assert coords.shape == (120, 2)
    assert pixels(path).shape == (300, 400, 3) and pixels(path).std() > 5
    idx = subsample_indices(400, 120, 3)
    assert len(np.unique(idx)) == 120 and np.all(np.diff(idx) > 0)
    np.testing.assert_array_equal(subsample_indices(50, 120), np.arange(50))


# ----------------------------------------------------------------------------- retrieval
@pytest.mark.parametrize("chunk", [7, 1024])
def test_nearest_neighbours_match_brute_force(chunk):
    rng = np.random.default_rng(chunk)
    bank, queries = rng.standard_normal((300, 16)), rng.standard_normal((40, 16))
    np.testing.assert_array_equal(nearest_neighbours(bank, queries, 8, chunk=chunk), brute_force(bank, queries, 8))
    own = nearest_neighbours(bank, bank[:25], 5, exclude_self=True, chunk=chunk)
    np.testing.assert_array_equal(own, brute_force(bank, bank[:25], 5, exclude_self=True))
    assert not np.any(own == np.arange(25)[:, None])
    assert nearest_neighbours(bank[:4], queries, 8).shape == (40, 4)                  # k capped at the bank size
    assert nearest_neighbours(bank[:4], bank[:4], 8, exclude_self=True).shape == (4, 3)


def test_retrieval_grid_layout_and_neighbours(tmp_path):
    rng = np.random.default_rng(0)
    bank_images = rng.integers(0, 256, (120, 8, 8, 3), dtype=np.uint8)
    bank_features = rng.standard_normal((120, 12)).astype(np.float32)
    queries = np.arange(5)
    path, idx = retrieval_grid(bank_images[queries], bank_images, bank_features, bank_features[queries],
                               tmp_path / "grid.png", k=8, exclude_self=True)
    np.testing.assert_array_equal(idx, brute_force(bank_features, bank_features[queries], 8, exclude_self=True))
    image = pixels(path)
    assert image.shape == (5 * 64 + 4 * 2, 9 * 64 + 7 * 2 + 10, 3)
    assert image.std() > 10
    block = lambda im: np.kron(im, np.ones((8, 8, 1)))            # an 8×8 image enlarged (nearest) to 64×64
    for r in range(5):
        top = r * 66
        np.testing.assert_array_equal(image[top:top + 64, :64], block(bank_images[r]))
        for j in (0, 7):
            left = 64 + 10 + j * 66
            np.testing.assert_array_equal(image[top:top + 64, left:left + 64], block(bank_images[idx[r, j]]))
    assert leftovers(tmp_path) == []


def test_retrieval_grid_frames_and_float_gray_images(tmp_path):
    x, y = clusters(60, 10, 3, seed=2)
    gray = np.random.default_rng(1).uniform(0, 1, (60, 28, 28, 1)).astype(np.float32)
    path, idx = retrieval_grid(gray[:4], gray, x, x[:4], tmp_path / "framed.png", k=3, exclude_self=True,
                               query_labels=y[:4], bank_labels=y, cell=32)
    image = pixels(path)
    assert image.shape == (4 * 32 + 3 * 2, 4 * 32 + 2 * 2 + 10, 3)
    for r in range(4):
        for j in range(3):
            corner = image[r * 34, 32 + 10 + j * 34]
            colour = (40, 170, 60) if y[idx[r, j]] == y[r] else (220, 40, 40)
            np.testing.assert_array_equal(corner, colour)


# ----------------------------------------------------------------------------- TensorBoard images
def test_log_images_to_tensorboard(tmp_path):
    rng = np.random.default_rng(0)
    paths = []
    for name, shape in (("one", (20, 30, 3)), ("two", (12, 12, 3))):
        p = str(tmp_path / f"{name}.png")
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(p)
        paths.append(p)
    logdir = tmp_path / "tb"
    assert log_images_to_tensorboard(logdir, "plots", paths, step=3) == ["plots/one", "plots/two"]
    assert log_images_to_tensorboard(logdir, "single", paths[0]) == ["single"]
    found = {}
    for f in sorted(os.listdir(logdir)):
        for event in tf.compat.v1.train.summary_iterator(str(logdir / f)):
            for v in event.summary.value:
                assert v.metadata.plugin_data.plugin_name == "images"
                width, height, png = tf.make_ndarray(v.tensor)                    # [width, height, png…]
                found[v.tag] = (event.step, int(width), int(height), tf.io.decode_png(png).numpy())
    assert set(found) == {"plots/one", "plots/two", "single"}
    assert found["plots/one"][:3] == (3, 30, 20) and found["plots/two"][:3] == (3, 12, 12)
    assert found["single"][0] == 0
    np.testing.assert_array_equal(found["plots/one"][3], pixels(paths[0]).astype(np.uint8))


# ----------------------------------------------------------------------------- projector
class _NoRuns:
    def list_runs(self, ctx, experiment_id=""):
        return []


def projector_view(logdir):
    """What TensorBoard's projector plugin reads from ``logdir``: {run: ProjectorConfig}, and the plugin."""
    from tensorboard.plugins import base_plugin
    from tensorboard.plugins.projector.projector_plugin import ProjectorPlugin
    plugin = ProjectorPlugin(base_plugin.TBContext(logdir=str(logdir), data_provider=_NoRuns()))
    plugin._update_configs()
    return plugin._configs, plugin


def test_write_projector_files_tensorboard_reads(tmp_path):
    x, y = clusters(50, 8, 3)
    sprites = np.random.default_rng(0).integers(0, 256, (50, 10, 10, 1), dtype=np.uint8)
    paths = write_projector(tmp_path, x, y, sprite_images=sprites)
    assert set(paths) == {"tensors", "metadata", "sprite", "config"}
    tensors = np.loadtxt(paths["tensors"], delimiter="\t")
    assert tensors.shape == (50, 8)
    np.testing.assert_allclose(tensors, x.astype(np.float32), rtol=1e-6)
    rows = open(paths["metadata"]).read().splitlines()
    assert rows == [str(v) for v in y]                                  # one column: no header, N rows
    with Image.open(paths["sprite"]) as sheet:
        assert sheet.size == (8 * 10, 8 * 10)                              # ceil(√50) = 8 thumbnails a side
    configs, plugin = projector_view(tmp_path)
    embedding = configs["."].embeddings[0]
    assert embedding.tensor_name == "embedding" and list(embedding.tensor_shape) == [50, 8]
    assert embedding.metadata_path == "metadata.tsv" and embedding.sprite.image_path == "sprite.png"
    assert list(embedding.sprite.single_image_dim) == [10, 10]
    np.testing.assert_allclose(plugin.tensor_cache.get((".", "embedding")), x.astype(np.float32), rtol=1e-6)
    assert leftovers(tmp_path) == []


def test_write_projector_class_names_and_large_sprites(tmp_path):
    x = np.random.default_rng(0).standard_normal((2, 4))
    tall = np.zeros((2, 6000, 10), np.uint8)                              # 2 × 6000 px > 8192: scaled down
    paths = write_projector(tmp_path, x, [1, 0], sprite_images=tall, class_names=["cat", "dog\tdingo"])
    assert open(paths["metadata"]).read().splitlines() == ["label\tclass", "1\tdog dingo", "0\tcat"]
    with Image.open(paths["sprite"]) as sheet:
        assert max(sheet.size) <= plots.SPRITE_MAX
    embedding = projector_view(tmp_path)[0]["."].embeddings[0]
    width, height = embedding.sprite.single_image_dim
    assert height > width and 2 * height <= plots.SPRITE_MAX
    with pytest.raises(ValueError):
        write_projector(tmp_path / "bad", x, [1, 0, 2])


def test_failed_writes_leave_the_previous_files(tmp_path, monkeypatch):
    x, y = clusters(30, 4, 2)
    first = write_projector(tmp_path, x, y)
    before = open(first["tensors"]).read()

    def half_then_fail(fname, *args, **kwargs):
        with open(fname, "w") as f:
            f.write("0.1\t0.2\n")
        raise OSError("disk full")
    monkeypatch.setattr(np, "savetxt", half_then_fail)
    with pytest.raises(OSError):
        write_projector(tmp_path, x * 2, y)
    assert open(first["tensors"]).read() == before
    assert leftovers(tmp_path) == []
    monkeypatch.undo()

    grid = tmp_path / "grid.png"
    images = np.zeros((30, 4, 4), np.uint8)
    retrieval_grid(images[:2], images, x, x[:2], grid, k=2)
    before = grid.read_bytes()

    def partial_save(self, fp, format=None, **kwargs):
        with open(fp, "wb") as f:
            f.write(b"\x89PNG")
        raise OSError("disk full")
    monkeypatch.setattr(Image.Image, "save", partial_save)
    with pytest.raises(OSError):
        retrieval_grid(images[:2] + 255, images, x, x[:2], grid, k=2)
    assert grid.read_bytes() == before and leftovers(tmp_path) == []
