"""asv benchmarks of gpulora (see BENCHMARKS.md at the repository root)."""
