"""Planned preprocessing: crop to nonzero, normalise, resample, write arrays + JSON properties."""
