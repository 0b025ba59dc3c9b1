"""lmforge: one toolkit for the whole life of a large language model."""
