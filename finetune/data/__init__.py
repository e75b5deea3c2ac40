"""Images from disk to batches.

- ``folders``: ImageFolder trees: class discovery, the train/val split, unreadable images, the dataset;
- ``labels``: label files (CSV/TSV of path, label, split): the same datasets, multi-label targets included;
- ``images``: decoding (JPEGs at reduced scale), EXIF orientation, the resize/crop/augment pipeline;
- ``imagecache``: decoded images kept in memory (or a file) so no image is decoded twice;
- ``loaders``: seeded samplers, decode threads working ahead, collate;
- ``demo``: the generated shapes data set.
"""
