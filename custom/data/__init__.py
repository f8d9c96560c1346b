"""The atlas, locations, intensities, augmentations and the training dataset over the prepared cache."""
