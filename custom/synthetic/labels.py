"""Label codes of the SYNTHETIC cohort's ground-truth maps (one place, so writers, tests and docs agree)."""

from __future__ import annotations

# Lesion label map (<id>_lesions.nii.gz), uint8. Codes 1-3 are emphysema; 4-5 are disease a -950 HU
# threshold does not see; 6-7 only occur in the COVID-like cohort.
NONE = 0
CENTRILOBULAR = 1
PARASEPTAL = 2
PANLOBULAR = 3
AIRWAY_WALL = 4  # bronchial wall thickening beyond the normal wall
AIR_TRAPPING = 5  # mildly hypo-attenuating lobular regions (about -900 HU, above the -950 threshold)
GROUND_GLASS = 6
CONSOLIDATION = 7

LESION_NAMES = {
    NONE: "none",
    CENTRILOBULAR: "centrilobular",
    PARASEPTAL: "paraseptal",
    PANLOBULAR: "panlobular",
    AIRWAY_WALL: "airway_wall_thickening",
    AIR_TRAPPING: "air_trapping",
    GROUND_GLASS: "ground_glass",
    CONSOLIDATION: "consolidation",
}
EMPHYSEMA_CODES = (CENTRILOBULAR, PARASEPTAL, PANLOBULAR)

# Lung mask (<id>_lung.nii.gz), uint8: which lung a voxel belongs to (atlas labels 50 and 100).
LUNG_NONE = 0
LUNG_RIGHT = 1  # atlas label 50
LUNG_LEFT = 2  # atlas label 100
ATLAS_LUNG_LABELS = {50: LUNG_RIGHT, 100: LUNG_LEFT}
