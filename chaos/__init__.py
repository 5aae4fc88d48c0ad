"""`make chaos`: faults injected into the real stack, and proof that nothing is lost or doubled."""
