//! stoker-format (placeholder)
