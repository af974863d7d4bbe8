//! stoker-cache (placeholder)
