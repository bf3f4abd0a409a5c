"""``config.data``'s defaults: their one home. ``config_lib.base_config`` starts from them and the data
sources read a missing field from them. Imports nothing (no TensorFlow), so validation can use it."""

DATA_DEFAULTS = dict(
    format="",  # the input format (data/formats/): '' detects it from name, else one by its name ('folder')
    data_dir=None,  # TFDS data_dir, or the root of a folder dataset
    train_split="train",
    eval_split="validation",
    crop_scale=(0.2, 1.0),  # RandomResizedCrop area range
    crop_ratio=(3 / 4, 4 / 3),  # ... and aspect-ratio range
    flip=True,
    shuffle_buffer=50_000,
    prefetch=2,  # batches prepared ahead on the host
    on_corrupt="skip",  # an unreadable image: 'skip' it (replaced by the next readable one, logged) or 'fail'
    max_consecutive_unreadable=20,  # more unreadable files in a row than this: DataError
    max_unreadable_fraction=0.1,  # more than this fraction of a source's files unreadable: DataError
    stall_timeout_s=300.0,  # no batch from the input pipeline for this long: DataError naming the source
    resize_method="bilinear",  # train crops -> image_size: 'bilinear' or 'bicubic' (docs/PERFORMANCE.md)
    antialias=False,  # antialiased train resize: costs host time (docs/PERFORMANCE.md)
    log_example_ids=False,  # append each step's example indices to WORKDIR/examples.process{i}.jsonl
)
