"""DiLoCo: inner steps local to each replica, rare outer steps on theta0 per layer range."""
