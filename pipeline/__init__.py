"""segpipe: label, convert and evaluate segmentation datasets at scale."""
