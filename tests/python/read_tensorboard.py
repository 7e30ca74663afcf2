"""Reads a directory of TensorBoard event files with TensorBoard's own reader (the
EventAccumulator behind `tensorboard --logdir`, purging on SessionLog.START as TensorBoard
does) and prints what it holds as JSON: scalars, images (PNG bytes as hex) and histograms per
tag. tests/tensorboard.rs compares it with the run's metrics.jsonl.

Usage: read_tensorboard.py DIR
"""

import json
import sys

from tensorboard.backend.event_processing import event_accumulator as ea


def main():
    acc = ea.EventAccumulator(
        sys.argv[1],
        # Keep every event of every kind (0 = unbounded). The keys are those of
        # DEFAULT_SIZE_GUIDANCE ("scalars", "histograms", ...); SUMMARY_TYPES names the
        # proto fields instead, and with it histograms would keep their default of 1 event.
        size_guidance={kind: 0 for kind in ea.DEFAULT_SIZE_GUIDANCE},
        purge_orphaned_data=True,
    )
    acc.Reload()
    tags = acc.Tags()
    out = {
        "scalars": {
            tag: [[e.step, e.value] for e in acc.Scalars(tag)]
            for tag in tags["scalars"]
        },
        "images": {
            tag: [
                {
                    "step": e.step,
                    "width": e.width,
                    "height": e.height,
                    "png": e.encoded_image_string.hex(),
                }
                for e in acc.Images(tag)
            ]
            for tag in tags["images"]
        },
        "histograms": {
            tag: [
                {
                    "step": e.step,
                    "min": e.histogram_value.min,
                    "max": e.histogram_value.max,
                    "num": e.histogram_value.num,
                    "sum": e.histogram_value.sum,
                    "buckets": len(e.histogram_value.bucket),
                    "bucket_total": sum(e.histogram_value.bucket),
                }
                for e in acc.Histograms(tag)
            ]
            for tag in tags["histograms"]
        },
    }
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
