"""Images from disk to batches.

- ``folders``: ImageFolder trees: class discovery and the layout's problems, the train/val split, unreadable
  images, the dataset (``ImageFiles``);
- ``labels``: label files (CSV/TSV of path, label, split): the same datasets, multi-label targets included;
- ``images``: decoding (JPEGs at reduced scale), EXIF orientation, the resize/crop/augment pipeline;
- ``imagecache``: decoded images kept in memory (or a file) so no image is decoded twice;
- ``loaders``: seeded samplers, decode threads working ahead (and augmenting), reading through the image cache,
  collate;
- ``mixing``: MixUp/CutMix of training batches into soft targets;
- ``demo``: the generated shapes data set.
"""
