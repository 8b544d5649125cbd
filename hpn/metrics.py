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

# -- serving cost (hpn/latency.py): the trained model on the champion path, on a CPU ---------
#: Milliseconds for one text, raw text -> prediction (`predict_all`), median and 95th percentile.
LATENCY_P50_MS = "latency_p50_ms"
LATENCY_P95_MS = "latency_p95_ms"
#: Texts per second predicted in batches of 64.
THROUGHPUT_B64 = "throughput_b64"
#: MiB the served model needs: the encoder's weights in its runtime's form (fp32 tensors for
#: torch, the ONNX graph for onnx / onnx-int8) plus the head(s)' state.
MODEL_SIZE_MB = "model_size_mb"
#: Trainable parameters of the head(s) that can be nonzero: a sparse head counts the weights
#: its mask keeps (hpn.sparse.head_parameter_count).
HEAD_PARAMS = "head_params"
LATENCY_METRICS = (LATENCY_P50_MS, LATENCY_P95_MS, THROUGHPUT_B64, MODEL_SIZE_MB, HEAD_PARAMS)

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

# -- regression (model.task=regression, and the regression half of joint) --------------------
VAL_MAE = "val_mae"
VAL_RMSE = "val_rmse"
VAL_R2 = "val_r2"
TEST_MAE = "test_mae"
TEST_RMSE = "test_rmse"
TEST_R2 = "test_r2"
#: Always predicting the training split's mean target, scored on test (the issue's name) and on
#: validation (what the registration check compares val_mae against).
MEAN_BASELINE_MAE = "mean_baseline_mae"
VAL_MEAN_BASELINE_MAE = "val_mean_baseline_mae"
#: The target range [lo, hi] taken from the training split: the two opposite prototypes' ends.
TARGET_LOW = "target_low"
TARGET_HIGH = "target_high"

# -- joint -----------------------------------------------------------------------------------
#: Joint's one number to choose by: the mean of accuracy and the regression's MAE skill
#: (1 - MAE / the mean-target baseline's MAE, on the same split). Both halves move it, so
#: the sampler and ASHA see the regression half too; each is also logged on its own.
VAL_JOINT_SCORE = "val_joint_score"
TEST_JOINT_SCORE = "test_joint_score"

# -- multi-label -----------------------------------------------------------------------------
VAL_MICRO_F1 = "val_micro_f1"
VAL_MACRO_F1 = "val_macro_f1"
TEST_MICRO_F1 = "test_micro_f1"
# TEST_MACRO_F1 above is shared with classification (same meaning: unweighted mean over labels)
TEST_MICRO_PRECISION = "test_micro_precision"
TEST_MACRO_PRECISION = "test_macro_precision"
TEST_MICRO_RECALL = "test_micro_recall"
TEST_MACRO_RECALL = "test_macro_recall"
TEST_HAMMING_LOSS = "test_hamming_loss"
TEST_SUBSET_ACCURACY = "test_subset_accuracy"
#: Mean number of labels per text: predicted on test vs true on test (a model that predicts
#: almost nothing shows here at once, where Hamming loss and accuracy hide it).
TEST_PRED_CARDINALITY = "test_pred_label_cardinality"
TEST_TRUE_CARDINALITY = "test_true_label_cardinality"
#: Predicting the training split's most frequent label for every text; and predicting no label.
MOST_FREQUENT_BASELINE_MICRO_F1 = "most_frequent_baseline_micro_f1"
VAL_MOST_FREQUENT_BASELINE_MICRO_F1 = "val_most_frequent_baseline_micro_f1"
ALL_NEGATIVE_BASELINE_MICRO_F1 = "all_negative_baseline_micro_f1"
ALL_NEGATIVE_BASELINE_HAMMING_LOSS = "all_negative_baseline_hamming_loss"
#: The decision rule chosen on validation: a cosine threshold, or top-k (the other is NaN-free:
#: only the chosen rule's metric is logged).
DECISION_THRESHOLD = "decision_threshold"
DECISION_TOP_K = "decision_top_k"
