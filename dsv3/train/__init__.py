"""Pre-training: DeepSeek-V3's recipe (AdamW, its schedule, auxiliary-loss-free balancing, MTP) on one device.

    from dsv3.train import TrainConfig, train
    result = train(TrainConfig(preset="small", max_steps=200, out="runs/small"))
    result.summary.val_loss
"""

from dsv3.train.config import TrainConfig
from dsv3.train.loop import Trainer, TrainingDiverged, TrainResult, train

__all__ = ["TrainConfig", "TrainResult", "Trainer", "TrainingDiverged", "train"]
