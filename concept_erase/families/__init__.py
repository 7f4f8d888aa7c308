"""Model families: what differs between SD 1.x/2.x, SDXL and the others, behind one interface
(`base.Family`). Importing this package registers every family."""

from concept_erase.families import sd, sdxl  # noqa: F401
