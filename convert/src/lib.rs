//! stoker-convert (placeholder)
