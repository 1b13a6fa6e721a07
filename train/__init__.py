"""EdgeKit training: tf_keras image classifiers with a self-describing artifact.

    from train import TrainConfig, train, write_artifact, create_model, list_models
"""

from train.models import create_model, list_models, model_arguments
from train.trainer import TrainConfig, TrainResult, train, write_artifact

__all__ = ["TrainConfig", "TrainResult", "create_model", "list_models", "model_arguments", "train", "write_artifact"]
