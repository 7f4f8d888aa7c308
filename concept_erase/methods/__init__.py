"""How an erasure combines its losses: lambda controllers, forget and retain objectives, the loss
functions, and the hook that stops a run once the concept is erased."""
