"""One call from a series to network maps, below every front end: ``inference`` (``run_inference``:
chunked, progress, cancel). The CLI, the Slicer Logic (through ``mrml``) and the demo call it."""
