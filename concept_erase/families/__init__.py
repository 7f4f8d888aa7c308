"""Model families: what differs between SD 1.x/2.x, SDXL, SD3 and FLUX.1, behind one interface
(`base.Family`). Each family registers itself in `base.FAMILIES` from its own module; the table imports them the
first time it is read."""
