"""Foundations every other folder builds on; imports nothing else of the Lib.

``errors`` (input / output errors, cancel, settings named as the user knows them), ``geometry`` (voxel
grids in LPS), ``plausibility`` (unit checks naming the likely mistake), ``device`` (CPU / GPU choice, torch
imported only when asked), ``output_files`` (staged, verified, all-or-none outputs), ``jobs`` (progress,
cancel, background jobs), ``reference_data`` (where the shared test data live), ``lazy_exports`` (a
package's public names loaded on first use).
"""
