"""Old home of the trainer, now split over ``gankern.gan`` (config, step, trainer, checkpoint, images, speed);
every name it had stays importable here."""
from .gan.checkpoint import (CKPT_FORMAT, CKPT_VERSION, CheckpointError, CheckpointWarning, RunFolder,  # noqa: F401
                             RunFolderError, RunLockedError, checkpoint_path, list_checkpoints, load_checkpoint,
                             load_state, models_from_checkpoint, payload_checksum, read_metrics, save_atomic,
                             save_checkpoint, validate_checkpoint)
from .gan.config import *  # noqa: F401,F403
from .gan.images import plot_losses, save_grid  # noqa: F401
from .gan.models import generate, make_models, recalibrate_batch_norm  # noqa: F401
from .gan.speed import compare_speed, time_steps  # noqa: F401
from .gan.step import *  # noqa: F401,F403
from .gan.trainer import *  # noqa: F401,F403
