"""`evaluation.dinov2` settings small enough for a CPU test on the built-in 32 px scenes: the
official pipelines, with crops, windows and iteration counts scaled down."""

DINOV2_SMALL = {
    "segmentation": {"crop_size": 32, "short_side": 32, "stride": 21, "iterations": 12, "batch_size": 8,
                     "warmup_iterations": 3},
    "depth": {"crop_size": [32, 32], "iterations": 12, "batch_size": 8, "warmup_iterations": 3, "max_depth": 1.0,
              "eval_crop": None, "augmentation": {"border_crop": None}},
    "linear": {"epochs": 2, "iterations_per_epoch": 4, "batch_size": 16, "crop_size": 32, "resize_size": 32,
               "learning_rates": [1e-3, 1e-2]},
    "knn": {"crop_size": 32, "resize_size": 32, "ks": [5, 20]},
}
