"""Small shared helpers: atomic file writes, sample grids, loggers."""
