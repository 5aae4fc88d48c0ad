"""`make bench`: the service measured against its ceilings on one machine, in one run."""
