"""Emphysema subtype detection (paper §4.3): a patch classifier on the DrasCLR encoder, its fine-tuning on
annotated boxes, and voxel-wise maps by sliding the classifier over the lung."""
