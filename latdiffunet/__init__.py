"""latdiffunet: self-configuring latent diffusion segmentation with per-voxel uncertainty.

Stages (one package each): ``experiment_planning`` -> ``preprocessing`` -> ``training`` ->
``inference`` -> ``evaluation``. Models live in ``networks``; the diffusion maths (schedules,
parameterisations, samplers) lives in ``diffusion`` and never imports a network.
"""

__version__ = "0.1.0"
