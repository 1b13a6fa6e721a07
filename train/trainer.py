"""Training: config in, artifact directory out.

    config = TrainConfig(model="fashion_cnn", dataset="digits")
    result = train(config)                     # keras model + metrics + history
    write_artifact(result, "artifacts/cnn")    # model.keras, manifest.json, plots

Devices (`train.devices`): every visible GPU through MirroredStrategy, else the CPU, or the CPU split
into N logical devices (`cpu:N`) so that replicated training runs anywhere; with TF_CONFIG set,
MultiWorkerMirroredStrategy across machines. Mixed precision computes in bfloat16 on a CPU and float16
on GPUs; the saved model is always float32 so that optimization and export see one dtype. Every epoch
can be checkpointed (`train.resume`) and logged for TensorBoard.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import sys
import tempfile
import time
import warnings
import zipfile
from pathlib import Path

import numpy as np

from runtime.artifacts.manifest import write_manifest
from runtime.charts import plot_confusion, plot_training
from runtime.datasets import Dataset, load_dataset
from runtime.errors import EdgeKitError, VerificationError, WorkFailed, first_line
from runtime.fsutil import staged_dir
from runtime.metrics import classification_summary
from train import backbones, resume as checkpoints
from train.devices import check_spec, strategy as make_strategy, tf_config as checked_tf_config
from train.graph import ends_in_softmax
from train.models import check_input_shape, create_model, get_spec, model_arguments

MODEL_FILE = "model.keras"


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    model: str  # a registered model name (train.models.list_models())
    dataset: str = "digits"  # digits | mnist | fashion_mnist | cifar10 | folder:PATH
    epochs: int = 40  # upper bound; early stopping usually ends sooner
    batch_size: int = 32  # global batch, split across replicas
    lr: float = 1e-3  # Adam learning rate, halved when validation loss stalls
    seed: int = 0  # seeds Python, numpy and TensorFlow
    patience: int = 6  # epochs without validation-loss improvement before stopping
    augment: bool = False  # random shifts (10%), zoom (10%) and rotation (10 deg) on training images
    mixed_precision: bool = False  # bfloat16 compute on a CPU, float16 on GPUs; weights and the saved model float32
    devices: str = "auto"  # auto | cpu | cpu:N | gpu | gpu:0,1 (train.devices)
    weights: str = "none"  # backbone models: none | imagenet | a weights file (train.backbones)
    freeze_backbone: bool = False  # backbone models: train the head with the backbone frozen
    fine_tune_from: str | None = None  # then unfreeze the backbone from this layer, at a tenth of the lr
    steps_per_execution: int = 1  # batches per call into TensorFlow (scripts/bench_train.py measures it)
    model_args: dict = dataclasses.field(default_factory=dict)  # overrides of the model's defaults
    data_dir: str | None = None
    image_size: tuple[int, int] | None = None  # resize the dataset to this (height, width)
    channels: int | None = None  # convert the dataset to 1 or 3 channels
    download: bool = True

    def __post_init__(self):
        for name in ("epochs", "batch_size", "patience", "steps_per_execution"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise EdgeKitError(f"--{name.replace('_', '-')} must be a positive integer; got {value!r}.")
        if not (isinstance(self.lr, (int, float)) and 0 < self.lr < 10 and math.isfinite(self.lr)):
            raise EdgeKitError(f"--lr must be a positive number below 10; got {self.lr!r}.")
        spec = get_spec(self.model)
        model_arguments(self.model, self.model_args)
        check_spec(self.devices)
        if not spec.backbone and (self.weights != "none" or self.freeze_backbone or self.fine_tune_from):
            raise EdgeKitError(f"--weights, --freeze-backbone and --fine-tune-from apply to the models on Keras "
                               f"applications backbones (mobilenet_v2, mobilenet_v3_small, efficientnet_b0, resnet50); "
                               f"'{self.model}' is trained from scratch.")
        if not isinstance(self.weights, str) or not self.weights:
            raise EdgeKitError(f"--weights takes none, imagenet or the path of a weights file; got {self.weights!r}.")

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["image_size"] = list(self.image_size) if self.image_size else None
        return data


@dataclasses.dataclass
class TrainResult:
    config: TrainConfig
    dataset: Dataset
    model: object  # keras.Model, float32
    history: dict
    best_epoch: int
    epochs_run: int
    train_seconds: float
    evaluation: dict  # classification_summary on the test split, plus loss
    devices: dict
    resumed_from: int | None = None  # epochs completed before an interruption, when resumed
    phases: list | None = None  # two-phase transfer learning: what each phase trained, its epochs and best epoch


def _augmenter(keras, seed):
    # Light, label-preserving geometry, as in the classic Fashion-MNIST recipes.
    return keras.Sequential([
        keras.layers.RandomTranslation(0.1, 0.1, fill_mode="constant", seed=seed),
        keras.layers.RandomZoom(0.1, fill_mode="constant", seed=seed + 1),
        keras.layers.RandomRotation(10 / 360, fill_mode="constant", seed=seed + 2),
    ], name="augment")


def _pipeline(tf, x, y, batch_size, seed, shuffle, augment=None):
    data = tf.data.Dataset.from_tensor_slices((x, y))
    if shuffle:
        data = data.shuffle(len(x), seed=seed, reshuffle_each_iteration=True)
    data = data.batch(batch_size)
    if augment is not None:
        data = data.map(lambda a, b: (augment(a, training=True), b), num_parallel_calls=tf.data.AUTOTUNE)
    return data.prefetch(tf.data.AUTOTUNE)


class _EpochLog:
    """One line per epoch for people; silent with quiet=True."""

    def __init__(self, keras, epochs, quiet):
        outer = self

        class Callback(keras.callbacks.Callback):
            def on_epoch_begin(self, epoch, logs=None):
                outer.start = time.perf_counter()

            def on_epoch_end(self, epoch, logs=None):
                if quiet:
                    return
                logs = logs or {}
                lr = float(keras.backend.get_value(self.model.optimizer.learning_rate))
                print(f"epoch {epoch + 1:>3}/{epochs}  loss {logs['loss']:.4f}  acc {logs['accuracy']:.4f}  "
                      f"val_loss {logs['val_loss']:.4f}  val_acc {logs['val_accuracy']:.4f}  "
                      f"lr {lr:.1e}  {time.perf_counter() - outer.start:.1f}s", flush=True)

        self.callback = Callback()
        self.start = 0.0


def _tensorboard(keras, log_dir: Path):
    """Keras's TensorBoard callback, writing per-epoch scalars and the graph. tf_keras writes the training
    graph after the first batch, but calls batch hooks only when profiling: without this, no graph."""

    class TensorBoard(keras.callbacks.TensorBoard):
        def _implements_train_batch_hooks(self):
            return True

    return TensorBoard(str(log_dir), write_graph=True, update_freq="epoch", profile_batch=0)


def compile_model(model, lr: float, steps_per_execution: int = 1) -> None:
    """Adam, cross-entropy (on logits, or on probabilities for a model from elsewhere that ends in softmax),
    accuracy. `steps_per_execution` runs that many batches per call into TensorFlow (less Python per step; the
    same updates)."""
    from train.backend import keras

    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=not ends_in_softmax(model))
    model.compile(optimizer=keras.optimizers.Adam(lr), steps_per_execution=steps_per_execution, loss=loss,
                  metrics=["accuracy"])


def fit(model, dataset: Dataset, *, epochs: int, batch_size: int, seed: int, quiet: bool,
        callbacks=(), augment: bool = False, initial_epoch: int = 0) -> dict:
    """Fit a compiled model on the train split, validating on val; one line per epoch. Returns the history.
    `initial_epoch`: epochs already run (a second phase numbers its epochs on from the first's)."""
    from train.backend import keras, tf

    x_train, y_train = dataset.arrays("train")
    x_val, y_val = dataset.arrays("val")
    augmenter = _augmenter(keras, seed) if augment else None
    train_data = _pipeline(tf, x_train, y_train, batch_size, seed, True, augmenter)
    val_data = _pipeline(tf, x_val, y_val, batch_size, seed, False)
    history = model.fit(train_data, validation_data=val_data, epochs=epochs, verbose=0, initial_epoch=initial_epoch,
                        callbacks=[*callbacks, _EpochLog(keras, epochs, quiet).callback])
    return {k: [float(v) for v in values] for k, values in history.history.items()}


def evaluate(model, dataset: Dataset) -> dict:
    """Accuracy, loss, per-class accuracy and confusion counts on the fixed test split."""
    from train.backend import keras

    x_test, y_test = dataset.arrays("test")
    logits = model.predict(x_test, batch_size=256, verbose=0)
    bad = int(logits.size - np.count_nonzero(np.isfinite(logits)))
    if bad:  # NaN is never a result: no artifact is written for a model that gives no numbers
        raise VerificationError(f"the trained model gives {bad:,} NaN or infinite outputs on the {len(x_test)} test "
                                "images (its loss diverged, or its starting weights hold NaN); nothing was written. "
                                "Check --weights, lower --lr, and train again.")
    summary = classification_summary(y_test, logits.argmax(axis=1), dataset.labels)
    probabilities = bool((logits >= 0).all()) and bool(np.allclose(logits.sum(axis=1), 1.0, atol=1e-3))  # a softmax end
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=not probabilities)
    summary["loss"] = float(loss(y_test, logits).numpy())
    return summary


def save_model(model, path: Path) -> None:
    """Save weights and architecture without optimizer state (smaller, and what deployment needs).

    `.h5` is used for tfmot's quantization-aware models, whose `.keras` files do not load
    back (tensorflow/model-optimization#1123); everything else is `.keras`.
    """
    from train.backend import keras

    if path.suffix == ".h5":
        with warnings.catch_warnings():  # HDF5 is chosen on purpose here; skip Keras's "legacy" warning
            warnings.simplefilter("ignore", UserWarning)
            model.save(path, include_optimizer=False)
    else:  # the native format has no include_optimizer: save an uncompiled copy
        clone = keras.models.clone_model(model)
        clone.set_weights(model.get_weights())
        clone.save(path)
        _reproducible_zip(path)


def _reproducible_zip(path: Path) -> None:
    """Make a `.keras` file depend only on the model: Keras stamps the save time into the zip
    entries and into metadata.json. Without it, the same seed gives the same weights but another
    sha256, and every artifact derived from the model looks stale to a resumed pipeline."""

    with zipfile.ZipFile(path) as source:
        entries = [(info, source.read(info)) for info in source.infolist()]
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as target:
        for info, data in entries:
            if info.filename == "metadata.json":
                meta = json.loads(data)
                meta.pop("date_saved", None)
                data = json.dumps(meta, sort_keys=True).encode()
            fixed = zipfile.ZipInfo(info.filename, date_time=(1980, 1, 1, 0, 0, 0))
            fixed.compress_type, fixed.external_attr = info.compress_type, info.external_attr
            target.writestr(fixed, data)
    path.write_bytes(buffer.getvalue())


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and TensorFlow, and make TensorFlow's ops deterministic on the CPU.

    Every stage that trains calls it (training, and each technique's fine-tuning): op determinism is
    process-wide, and a resumed pipeline that skips training must fine-tune exactly as a fresh one.
    """
    from train.backend import keras, tf

    keras.utils.set_random_seed(seed)
    if not tf.config.list_physical_devices("GPU"):
        tf.config.experimental.enable_op_determinism()


def train(config: TrainConfig, quiet: bool = False, dataset: Dataset | None = None, *,
          checkpoint: Path | None = None, resume: bool = False, force: bool = False,
          tensorboard: str | Path | None = None) -> TrainResult:
    """Train `config.model` on `config.dataset`; returns the float32 model with the best validation loss.

    checkpoint: a directory to back every epoch up into (`train.resume`); with `resume`, an interrupted
    training there continues from its last completed epoch (`force` discards one instead).
    tensorboard: a directory for TensorBoard's event files (loss, accuracy and learning rate per epoch,
    and the graph).
    """
    spec = get_spec(config.model)
    dataset = dataset or _load_for(config, spec)
    check_input_shape(config.model, dataset.input_shape)

    from train.backend import keras, tf

    # phases: (layer to unfreeze the backbone from, or "" for none; learning rate). One phase trains everything.
    phases = [(None, config.lr)]
    if spec.backbone and (config.freeze_backbone or config.fine_tune_from):
        phases = [("", config.lr)] + ([(config.fine_tune_from, config.lr / 10)] if config.fine_tune_from else [])
    if len(phases) > 1 and resume:
        raise EdgeKitError("--resume does not cover two-phase training (--fine-tune-from) yet; train again without "
                           "--resume (add --force to discard the checkpoint).")
    if len(phases) > 1:
        checkpoint = None
    if spec.backbone:  # the backbone's own preprocessing, as data: the runtime repeats it
        dataset = dataclasses.replace(dataset, preprocessing=backbones.preprocessing(config.model, dataset.preprocessing))
    if tensorboard is not None:
        try:
            import tensorboard as _  # noqa: F401  (tf.summary writes nothing without it)
        except ImportError as exc:
            raise EdgeKitError("--tensorboard needs the tensorboard package, which is not installed; "
                               "pip install '.[train]' in EdgeKit's repository (or pip install tensorboard).") from exc
    chief = is_chief()
    say = (lambda line: None) if quiet else (lambda line: print(line, file=sys.stderr, flush=True))
    resuming = checkpoint is not None and checkpoints.prepare(Path(checkpoint), config.to_dict(), resume, force,
                                                              chief, say)
    strategy, devices = make_strategy(tf, config.devices)  # first: devices can only be split before TF starts
    seed_everything(config.seed)
    on_gpu = any(name.startswith("/gpu") for name in devices["devices"])
    policy = ("mixed_float16" if on_gpu else "mixed_bfloat16") if config.mixed_precision else None
    devices["mixed_precision"] = policy
    weights = None if config.weights == "none" else config.weights

    def build(mixed: bool, weights=None):
        extra = {"weights": weights, "download": config.download} if spec.backbone else {}
        model = create_model(config.model, dataset.input_shape, dataset.num_classes, **extra, **config.model_args)
        if mixed:  # the loss sees float32 logits, as Keras's mixed-precision guide has it
            logits = keras.layers.Activation("linear", dtype="float32", name="logits_float32")(model.output)
            model = keras.Model(model.input, logits, name=model.name)
        return model

    if policy:
        keras.mixed_precision.set_global_policy(policy)
    scratch = contextlib.ExitStack()  # other workers' TensorBoard files, which nobody reads
    history, record, backup, train_seconds = {}, [], None, 0.0
    try:
        with strategy.scope():
            model = build(bool(policy), weights)
        if spec.backbone and config.fine_tune_from:  # a wrong layer name fails now, not after the head's phase
            backbones.check_layer(model, config.model, config.fine_tune_from)
        board = None
        if tensorboard is not None:
            log_dir = Path(tensorboard) if chief else scratch.enter_context(tempfile.TemporaryDirectory())
            board = _tensorboard(keras, log_dir)
        if not quiet:
            sizes = dataset.describe()["split"]["sizes"]
            print(f"training {config.model} on {dataset.name}: {sizes['train']} train / {sizes['val']} val / "
                  f"{sizes['test']} test images {dataset.input_shape}, {model.count_params():,} parameters, "
                  f"{devices['strategy']} x{devices['replicas']} ({', '.join(devices['devices'])}"
                  f"{', ' + policy if policy else ''})", flush=True)
            if resuming:
                print(f"resuming from the checkpoint in {checkpoint}", flush=True)
        for unfreeze_from, lr in phases:
            trainable = None
            if unfreeze_from is not None:
                trainable = backbones.freeze(model, config.model, unfreeze_from or None)
                if not quiet:
                    what = f"the backbone from {unfreeze_from}" if unfreeze_from else "the head, backbone frozen"
                    print(f"phase {len(record) + 1}/{len(phases)}: {what} ({trainable} backbone layers trainable), "
                          f"lr {lr:g}", flush=True)
            with strategy.scope():
                compile_model(model, lr, config.steps_per_execution)
            stopper = keras.callbacks.EarlyStopping("val_loss", patience=config.patience, restore_best_weights=True)
            plateau = keras.callbacks.ReduceLROnPlateau("val_loss", factor=0.5, patience=2, min_lr=1e-5 * lr / config.lr)
            callbacks = [keras.callbacks.TerminateOnNaN(), stopper, plateau]  # a NaN loss stops; evaluate refuses
            if checkpoint is not None:
                checkpoints.start(Path(checkpoint), config.to_dict(), chief)
                backup = checkpoints.callback(keras, Path(checkpoint), stopper, plateau, chief)
                callbacks.append(backup)
            if board is not None:  # after the plateau callback, which puts the learning rate in the logs
                callbacks.append(board)
            done = len(history.get("loss", []))
            start = time.perf_counter()
            try:
                part = fit(model, dataset, epochs=done + config.epochs, batch_size=config.batch_size,
                           seed=config.seed, quiet=quiet, callbacks=callbacks, augment=config.augment,
                           initial_epoch=done)
            except tf.errors.OpError as exc:  # a lost worker, memory exhausted: the work failed, say it in a line
                lost = devices["workers"] > 1 and isinstance(exc, (tf.errors.UnavailableError, tf.errors.AbortedError,
                                                                   tf.errors.CancelledError,
                                                                   tf.errors.DeadlineExceededError))
                what = "a worker of TF_CONFIG's cluster was lost" if lost else "TensorFlow stopped the training"
                kept = f"; the completed epochs are kept in {checkpoint}: run the same command with --resume" \
                    if checkpoint is not None else ""
                lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
                said = next((line for line in lines if "unhealthy" in line or "aborted by" in line),
                            first_line(exc))  # TensorFlow's first line is "Graph execution error:"
                raise WorkFailed(f"{what} ({type(exc).__name__}: {said[:200]}){kept}.") from exc
            train_seconds += time.perf_counter() - start
            if backup is not None and backup.resumed_from is not None:
                part = {k: backup.history_before.get(k, []) + part.get(k, []) for k in {*backup.history_before, *part}}
            history = {k: history.get(k, []) + part.get(k, []) for k in {*history, *part}}
            record.append({"unfreeze_from": unfreeze_from, "lr": lr, "trainable_backbone_layers": trainable,
                           "epochs_run": len(part.get("loss", [])), "best_epoch": stopper.best_epoch + 1})
    finally:
        keras.mixed_precision.set_global_policy("float32")
        scratch.close()
    if spec.backbone:
        backbones.unfreeze(model)  # saved whole: optimize fine-tunes every layer
    resumed_from = backup.resumed_from if backup is not None else None
    if policy:  # save one dtype: rebuild in float32 and carry the trained weights over
        float_model = build(False)
        float_model.set_weights(model.get_weights())
        model = float_model
    return TrainResult(config, dataset, model, history, best_epoch=stopper.best_epoch + 1,  # absolute: epochs run on
                       epochs_run=len(history["loss"]), train_seconds=train_seconds,
                       evaluation=evaluate(model, dataset), devices=devices, resumed_from=resumed_from,
                       phases=record if record[0]["unfreeze_from"] is not None else None)


def _load_for(config: TrainConfig, spec) -> Dataset:
    """The dataset; for a backbone model in RGB (grayscale repeated) and at least the backbone's input size."""
    channels = config.channels or (3 if spec.backbone else None)
    dataset = load_dataset(config.dataset, config.data_dir, config.image_size, channels, download=config.download)
    if spec.backbone and config.image_size is None and min(dataset.input_shape[:2]) < spec.min_size:
        dataset = load_dataset(config.dataset, config.data_dir, (spec.min_size, spec.min_size), channels,
                               download=config.download)
    return dataset


def is_chief() -> bool:
    """Under MultiWorkerMirroredStrategy only the chief (or worker 0 when there is none) keeps the artifact."""

    tf_config = checked_tf_config()
    task = tf_config.get("task")
    if not task or task.get("type") == "chief":
        return True
    return task.get("type") == "worker" and task.get("index") == 0 and "chief" not in tf_config.get("cluster", {})


def write_artifact(result: TrainResult, out: str | Path, force: bool = False) -> dict:
    """Write model.keras, training.png, confusion.png and manifest.json into `out`, atomically."""

    out = Path(out)
    dataset, config = result.dataset, result.config
    with staged_dir(out, force=force) as stage:
        save_model(result.model, stage / MODEL_FILE)
        title = f"{config.model} on {dataset.name}"
        plot_training(result.history, stage / "training.png", title, result.best_epoch)
        plot_confusion(np.asarray(result.evaluation["confusion"]), dataset.labels, stage / "confusion.png",
                       f"{title}: test accuracy {result.evaluation['accuracy']:.2%}")
        manifest = {
            "name": out.name,
            "kind": "trained",
            "model": config.model,
            "model_args": _jsonable(model_arguments(config.model, config.model_args)),
            "dataset": dataset.describe(),
            "parent": None,
            "model_file": MODEL_FILE,
            "preprocessing": dataset.preprocessing.to_dict(),
            "labels": list(dataset.labels),
            "input_shape": list(dataset.input_shape),
            "num_classes": dataset.num_classes,
            "metrics": {
                "accuracy": result.evaluation["accuracy"],
                "loss": result.evaluation["loss"],
                "val_accuracy": result.history["val_accuracy"][result.best_epoch - 1],
                "size_bytes": (stage / MODEL_FILE).stat().st_size,
                "params": int(result.model.count_params()),
                "per_class_accuracy": result.evaluation["per_class_accuracy"],
                "confusion": result.evaluation["confusion"],
            },
            "training": {
                "config": config.to_dict(),
                "seed": config.seed,
                "epochs_run": result.epochs_run,
                "best_epoch": result.best_epoch,
                "train_seconds": round(result.train_seconds, 2),
                "devices": result.devices,
                "resumed_from_epoch": result.resumed_from,
                "phases": result.phases,
                "history": result.history,
            },
        }
        manifest = write_manifest(stage, manifest, [MODEL_FILE, "training.png", "confusion.png"])
    return manifest


def _jsonable(value):
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value
