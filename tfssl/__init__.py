"""tfssl: relation-aware self-supervised learning (ReSSL, WCL, CsMl, SimCLR, MoCo v2) for Keras 3 / TensorFlow."""
import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

__version__ = "0.1.0"

# Importing the package registers what a recipe and a saved model name: every method (config's method registry and
# Keras's serializable "tfssl>…" classes), the view layers, backbone layers and optimizers, so that
# keras.saving.load_model("model.keras") needs no custom_objects after `import tfssl`.
from tfssl import methods as _methods  # noqa: E402,F401  (the methods, backbones, optimizers)
from tfssl import views as _views  # noqa: E402,F401  (the view layers: a saved keras.Sequential of them loads)
