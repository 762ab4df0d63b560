# Stand-in (see SlicerConfig.cmake): nothing to generate.
