"""Model families: what differs between SD 1.x/2.x, SDXL, SD3 and FLUX.1, behind one interface
(`base.Family`). Importing this package registers every family."""

from concept_erase.families import flux, sd, sd3, sdxl  # noqa: F401
