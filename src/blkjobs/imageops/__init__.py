"""Whole-image operations used by the command line and the library: convert,
compare, map, info. They sit on the formats/graph layers and the C copy
engine; they know nothing of jobs."""
