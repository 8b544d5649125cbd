"""Metric names: the MLflow keys, defined once and imported by trainer, Tune and registry.

Renaming one breaks every stored study's comparison, so keep them stable.
"""
from __future__ import annotations

VAL_ACCURACY = "val_accuracy"
VAL_LOSS = "val_loss"
TRAIN_LOSS = "train_loss"
TEST_ACCURACY = "test_accuracy"
TEST_MACRO_F1 = "test_macro_f1"
SEPARATION_MIN_ANGLE_DEG = "separation_min_angle_deg"
SEPARATION_MAX_COSINE = "separation_max_cosine"
RUNTIME_S = "runtime_s"
TRAIN_SAMPLES_PER_S = "train_samples_per_s"
PEAK_VRAM_MB = "peak_vram_mb"
PEAK_RSS_MB = "peak_rss_mb"
#: The trial process's whole device footprint as nvidia-smi shows it (CUDA context included).
PEAK_VRAM_PROCESS_MB = "peak_vram_process_mb"
MAJORITY_BASELINE_ACCURACY = "majority_baseline_accuracy"
#: The training split's most frequent class scored on the validation split: the trivial
#: baseline the registry's check compares val_accuracy against (never the test split).
VAL_MAJORITY_BASELINE_ACCURACY = "val_majority_baseline_accuracy"
#: How far (accuracy points) val_accuracy must beat that baseline for a model to be
#: registered or promoted: a diverged trial sits at or below it, a trained one far above.
DEFAULT_BASELINE_MARGIN = 0.02
#: How many prototypes the model has (the total, whichever way the config gave it).
NUM_PROTOTYPES = "num_prototypes"
EPOCH = "epoch"

#: Metrics reported after every epoch (step = epoch in MLflow).
EPOCH_METRICS = (
    TRAIN_LOSS,
    VAL_LOSS,
    VAL_ACCURACY,
    SEPARATION_MIN_ANGLE_DEG,
    SEPARATION_MAX_COSINE,
)

#: Metrics known once a training run has finished.
FINAL_METRICS = (
    VAL_ACCURACY,
    TEST_ACCURACY,
    TEST_MACRO_F1,
    SEPARATION_MIN_ANGLE_DEG,
    SEPARATION_MAX_COSINE,
    RUNTIME_S,
    TRAIN_SAMPLES_PER_S,
    MAJORITY_BASELINE_ACCURACY,
    VAL_MAJORITY_BASELINE_ACCURACY,
    NUM_PROTOTYPES,
)
