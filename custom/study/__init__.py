"""The evidence study (issue #14): one command that generates a SYNTHETIC cohort, pre-trains DrasCLR and its
baselines on the same budget, reads them out at several shares of it and compares them with paired bootstrap
intervals (bundle/configs/study.yaml, bundle/docs/study.md)."""
