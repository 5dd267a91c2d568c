"""PASCAL VOC 2012 data: datasets and loaders (data), file formats (lists), tools, synthetic set."""
